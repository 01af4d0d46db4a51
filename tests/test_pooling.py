"""The classifier reads the embedding the encoder was trained for; its head can start at zero or stay frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from sentence_transformers import SentenceTransformer

from aslora.adapters import LoraView
from aslora.checkpoint import load_checkpoint
from aslora.config import ConfigError, load_config
from aslora.experiment import run_experiment
from aslora.pretrained import resolve_model
from aslora.tasks import load_task
from aslora.tasks.pooling import POOLINGS, declared_pooling, pooled_classifier

REPO = Path(__file__).resolve().parents[1]


def _config(data_dir: Path, **overrides):
    return load_config(REPO / "tests" / "base.toml").with_overrides(
        {"data.dir": str(data_dir), "data.train_subset": 64, "data.eval_subset": 16, "model.max_length": 32}
        | overrides
    )


def test_minilm_declares_mean_pooling() -> None:
    assert declared_pooling(resolve_model("minilm")) == "mean"


def test_auto_pooling_is_sentence_transformers_embedding(data_dir: Path) -> None:
    """Our 'auto' embedding of MiniLM with model.normalize equals sentence-transformers' own pipeline
    (Transformer, Pooling, Normalize); without it, the same direction at the mean's own length."""
    config = _config(data_dir, **{"model.normalize": True})
    task = load_task(config)
    assert task.pooling == "mean" and task.normalize
    texts = ["a gripping , funny film", "dull", "it is neither here nor there , and long"]
    enc = task.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        unit = task.build_model(config).base_model.model.embed(enc["input_ids"], enc["attention_mask"])
        raw = pooled_classifier(task.model_path, task.pooling, 2).eval().embed(enc["input_ids"], enc["attention_mask"])
    theirs = SentenceTransformer(task.model_path, device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(unit, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=0.1)  # the raw mean is not unit-length


@pytest.mark.parametrize(("pooling", "trains_pooler"), [("mean", False), ("cls", False), ("pooler", True)])
def test_the_pooler_is_a_head_module_only_when_the_classifier_reads_it(data_dir: Path, pooling: str, trains_pooler: bool) -> None:
    """An unused pooler gets no gradient (Opacus fails on it mid-round): naming it fails at build time instead."""
    config = _config(data_dir, **{"model.pooling": pooling, "lora.head_modules": ["classifier", "pooler"]})
    task = load_task(config)
    if trains_pooler:
        assert any(".pooler." in name for name in LoraView(task.build_model(config)).head)
    else:
        with pytest.raises(ValueError, match=r"\['pooler'\].*only with model.pooling='pooler'"):
            task.build_model(config)


@pytest.mark.parametrize("pooling", [p for p in POOLINGS if p != "auto"])
def test_every_pooling_builds_and_differs(data_dir: Path, pooling: str) -> None:
    task = load_task(_config(data_dir, **{"model.pooling": pooling}))
    view = LoraView(task.build_model(_config(data_dir, **{"model.pooling": pooling})))
    batch = task.encode(task.eval)[:4]
    with torch.no_grad():
        inner = view.model.base_model.model
        emb = inner.embed(*batch[:2])
    assert emb.shape == (4, 384)
    assert set(view.head) == {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"}


def test_zero_head_starts_at_zero_logits(data_dir: Path) -> None:
    config = _config(data_dir, **{"lora.head_init": "zero"})
    task = load_task(config)
    view = LoraView(task.build_model(config))
    with torch.no_grad():
        logits = view.model(**task._inputs(task.encode(task.eval)[:4])).logits
    assert torch.count_nonzero(logits) == 0


@pytest.mark.parametrize("dropout", [None, 0.0])
def test_model_dropout_replaces_the_pretrained_rates_only(data_dir: Path, dropout: float | None) -> None:
    """model.dropout = 0 makes a training-mode forward pass deterministic; lora.dropout stays its own."""
    config = _config(data_dir, **{"model.dropout": dropout, "lora.dropout": 0.05})
    task = load_task(config)
    model = task.build_model(config).train()
    rates = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert {p for name, p in rates.items() if "lora_dropout" in name} == {0.05}
    assert {p for name, p in rates.items() if "lora_dropout" not in name} == {0.1 if dropout is None else 0.0}
    for name, m in model.named_modules():
        if "lora_dropout" in name and isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # isolate the model's own dropout
    batch = task._inputs(task.encode(task.eval)[:4])
    with torch.no_grad():
        first, second = model(**batch).logits, model(**batch).logits
    assert torch.equal(first, second) == (dropout == 0.0)


def test_lora_layers_adapt_only_the_named_blocks(data_dir: Path) -> None:
    config = _config(data_dir, **{"lora.layers": [3, 5]})
    task = load_task(config)
    view = LoraView(task.build_model(config))
    assert {int(layer.split(".layer.")[1].split(".")[0]) for layer in view.layers} == {3, 5}
    with pytest.raises(ValueError, match=r"lora.layers names blocks \[9\].*blocks 0 to 5"):
        task.build_model(config.with_overrides({"lora.layers": [9]}))
    with pytest.raises(ConfigError, match="distinct and >= 0"):
        config.with_overrides({"lora.layers": [-1]})


def test_bad_pooling_and_head_fail_before_training(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="head_init='zero' with train_head=false"):
        _config(data_dir, **{"lora.head_init": "zero", "lora.train_head": False})
    with pytest.raises(ConfigError, match="model.pooling"):
        _config(data_dir, **{"model.pooling": "mean", "data.task": "synthetic"})
    with pytest.raises(ConfigError, match="model.normalize.*task 'synthetic'.*remove model.normalize"):
        _config(data_dir, **{"model.normalize": True, "data.task": "synthetic"})
    with pytest.raises(ConfigError, match="model.normalize.*should be a valid boolean|model.normalize.*bool"):
        _config(data_dir, **{"model.normalize": "yes please"})
    with pytest.raises(ConfigError, match="auto, cls, mean, pooler|'auto', 'cls', 'mean' or 'pooler'"):
        _config(data_dir, **{"model.pooling": "max"})
    with pytest.raises(ValueError, match="does not have"):
        config = _config(data_dir, **{"lora.head_modules": ["score"]})
        load_task(config).build_model(config)


def test_frozen_head_exports_and_reloads_to_the_same_logits(data_dir: Path, tmp_path: Path) -> None:
    """A run with the authors' frozen random head: the PEFT export carries that head, logits match exactly."""
    config = _config(
        data_dir,
        **{
            "output_dir": str(tmp_path),
            "lora.train_head": False,
            "data.num_clients": 2,
            "federation.rounds": 1,
            "federation.clients_per_round": 2,
            "federation.local_steps": 2,
            "optim.batch_size": 8,
            "method": "aslora",
        },
    )
    result = run_experiment(config)
    task = load_task(config)
    data = task.encode(task.eval)[:8]
    final = load_checkpoint(result.directory).state  # the federation's global model after the last round
    trained = LoraView(task.build_model(config))
    trained.set_factors(final.factors)
    trained.set_head(final.head)
    # The reload a user writes (README): the same base as the run, then PEFT's own loader.
    torch.manual_seed(12345)  # another head init: the export must bring the run's own head
    base = pooled_classifier(resolve_model("minilm"), "mean", 2)
    fresh_head = base.classifier.weight.detach().clone()
    reloaded = PeftModel.from_pretrained(base, str(result.directory / "adapter")).eval()
    trained.model.eval()
    with torch.no_grad():
        expected = trained.model(**task._inputs(data)).logits
        got = reloaded(**task._inputs(data)).logits
    run_head = next(v for k, v in final.head.items() if k.endswith("weight"))
    assert not torch.allclose(fresh_head, run_head)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_bfloat16_encoder_keeps_dp_sgd_in_float32(data_dir: Path) -> None:
    """A bfloat16 frozen encoder: LoRA, head and per-sample gradients stay float32; logits near float32's."""
    from opacus import GradSampleModule

    logits, grads = {}, {}
    for dtype in ("float32", "bfloat16"):
        config = _config(data_dir, **{"model.dtype": dtype})
        task = load_task(config)
        view = LoraView(task.build_model(config))
        params = view.set_trainable({layer: ("B",) for layer in view.layers}, train_head=True)
        assert {p.dtype for p in params} == {torch.float32}
        view.set_factors({layer: {"B": torch.full_like(view.parameter(layer, "B"), 0.01)} for layer in view.layers})
        batch = task.encode(task.eval)[:8]
        for m in view.model.modules():  # Opacus records in train mode; without dropout both see one function
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        module = GradSampleModule(view.model, batch_first=True, loss_reduction="mean")
        module.train()
        out = module(**task._inputs(batch))
        out.loss.backward()
        logits[dtype] = out.logits.detach()
        grads[dtype] = params[0].grad_sample.detach().clone()
        assert grads[dtype].dtype == torch.float32
        module.to_standard_module()
    torch.testing.assert_close(logits["bfloat16"], logits["float32"], rtol=0.05, atol=0.02)
    cosine = torch.nn.functional.cosine_similarity(grads["bfloat16"].flatten(1), grads["float32"].flatten(1), dim=1)
    assert float(cosine.min()) > 0.98


def test_bfloat16_needs_a_pooled_classifier(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="model.dtype"):
        _config(data_dir, **{"model.dtype": "bfloat16", "data.task": "synthetic"})


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """Emulated bfloat16 is ~30x slower than float32 (AVX2 CPUs): 'auto' takes it only where it is native."""
    import aslora.pretrained

    monkeypatch.setattr(aslora.pretrained, "native_bfloat16", lambda: native)
    pooled = load_task(_config(data_dir, **{"model.dtype": "auto"}))
    assert pooled.dtype == ("bfloat16" if native else "float32")
    undeclared = tmp_path / "minilm-without-pooling"  # the same model, no sentence-transformers pooling
    undeclared.mkdir()
    for item in Path(resolve_model("minilm")).iterdir():
        if item.name != "1_Pooling":
            (undeclared / item.name).symlink_to(item)
    own_head = load_task(_config(data_dir, **{"model.dtype": "auto", "model.name": str(undeclared)}))
    assert own_head.pooling is None and own_head.dtype == "float32"  # the architecture's head runs in float32
    with pytest.raises(ConfigError, match="model.normalize scales a pooled embedding.*set model.pooling"):
        load_task(_config(data_dir, **{"model.normalize": True, "model.name": str(undeclared)}))
    assert _config(data_dir, **{"model.dtype": "auto", "data.task": "synthetic"}).model.dtype == "auto"


def test_a_micro_batch_that_cannot_fit_fails_before_training(data_dir: Path) -> None:
    config = _config(data_dir, **{"optim.micro_batch_size": 10_000_000, "model.max_length": 512})
    with pytest.raises(ConfigError, match=r"optim.micro_batch_size: a physical batch of 10000000 .* set optim.micro_batch_size to \d+ or less"):
        load_task(config)


def _qnli(data_dir: Path, **overrides):
    return _config(data_dir, **{"data.task": "qnli", "model.max_length": 48} | overrides)


def test_a_bi_encoder_embeds_the_two_sentences_of_a_pair_apart(data_dir: Path) -> None:
    """model.pair_encoding 'auto' on MiniLM (which declares its pooling): each sentence on its own,
    and the head reads [u, v, |u - v|, u * v], as sentence-transformers' SoftmaxLoss does; 'joint'
    keeps one sequence."""
    config = _qnli(data_dir)
    task = load_task(config)
    assert task.pairs
    data = task.encode(task.eval.select(range(3)))
    ids, mask, ids_b, mask_b, _ = data.tensors
    model = task.build_model(config).eval()
    classifier = model.base_model.model
    assert classifier.classifier.in_features == 4 * classifier.encoder.config.hidden_size
    with torch.no_grad():
        u, v = classifier.embed(ids, mask), classifier.embed(ids_b, mask_b)
        features = classifier.features(ids, mask, ids_b, mask_b)
        out = model(**task._inputs(data.tensors))
    torch.testing.assert_close(features, torch.cat([u, v, (u - v).abs(), u * v], dim=-1))
    assert out.logits.shape == (3, 2) and torch.isfinite(out.loss)
    joint = load_task(_qnli(data_dir, **{"model.pair_encoding": "joint"}))
    assert not joint.pairs and len(joint.encode(joint.eval.select(range(3))).tensors) == 3


def test_opacus_clips_a_separately_embedded_pair_as_one_example(data_dir: Path) -> None:
    """The encoder runs twice per example; Opacus's per-sample gradient must be the gradient of that
    example's loss over both passes, so that DP-SGD bounds each pair's contribution once."""
    from opacus import GradSampleModule

    config = _qnli(data_dir, **{"lora.head_init": "random"})
    task = load_task(config)
    model = task.build_model(config).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    data = task.encode(task.train.select(range(4)))
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    torch.nn.functional.cross_entropy(wrapped(**task._inputs(data.tensors)).logits, data.tensors[-1], reduction="sum").backward()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name, _ in trained)
    per_sample = {name: p.grad_sample.clone() for name, p in trained}
    for i in range(4):
        model.zero_grad()
        for _, p in trained:
            p.grad_sample = None
        single = tuple(t[i : i + 1] for t in data.tensors)
        torch.nn.functional.cross_entropy(model(**task._inputs(single)).logits, single[-1], reduction="sum").backward()
        for name, p in trained:
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_separate_pairs_need_a_pair_task(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="has no sentence pairs"):
        _config(data_dir, **{"model.pair_encoding": "separate"})
