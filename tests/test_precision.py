"""The one precision decision (precision=auto|fp32|bf16, NANOCHAT_PRECISION) and one compute dtype per forward:
bf16 over fp32 weights (training's autocast) and over bf16 weights (inference) compute the same numbers, bf16
stays within a stated distance of fp32, and a generation keeps its dtype across yields, threads and an autocast
policy that runs the norms in fp32 (CUDA's)."""

import copy
import threading

import pytest
import torch

from nanochat import precision as prec
from nanochat.configs import compose
from nanochat.engine.batching import BatchDecoder
from nanochat.engine.engine import Engine
from nanochat.errors import UserError
from nanochat.models.components import gpt as gpt_module

# bf16 logits of the tiny random test model (weights N(0, 0.3^2), logits up to ~9) stay this close to fp32's,
# relative to the largest fp32 logit: measured 0.12 / 9.0 = 1.3 %.
BF16_LOGIT_TOLERANCE = 0.03


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(prec.ENV, raising=False)


def native(monkeypatch, yes: bool):
    monkeypatch.setattr("nanochat.hardware.bf16_support", lambda device_type: (yes, "CPU (TEST)"))


@pytest.mark.parametrize("hardware_native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_hardware(no_env, monkeypatch, hardware_native, expected):
    native(monkeypatch, hardware_native)
    chosen = prec.resolve("auto", "cpu")
    assert chosen.name == expected and chosen.lightning == prec.LIGHTNING[expected]
    assert str(chosen) == (
        f"precision: {expected} (auto: CPU (TEST) "
        f"{'multiplies bf16 natively' if hardware_native else 'has no native bf16'})"
    )


def test_the_environment_overrides_auto_and_an_explicit_value_overrides_both(monkeypatch):
    native(monkeypatch, True)
    monkeypatch.setenv(prec.ENV, "fp32")
    assert prec.resolve("auto").name == "fp32" and prec.resolve("auto").reason == "NANOCHAT_PRECISION=fp32"
    assert prec.resolve("bf16").name == "bf16" and prec.resolve("BF16").reason == "precision=bf16"
    native(monkeypatch, False)
    monkeypatch.setenv(prec.ENV, "bf16")
    assert str(prec.resolve("auto")) == (
        "precision: bf16 (NANOCHAT_PRECISION=bf16; not native on this CPU (TEST), so emulated and slow)"
    )
    assert prec.resolve("fp32").name == "fp32" and prec.resolve("bf16").dtype == torch.bfloat16


def test_bad_values_are_one_sentence_naming_the_key(monkeypatch):
    with pytest.raises(UserError, match=r"^precision='fp16' is not one of auto, fp32, bf16$"):
        prec.resolve("fp16")
    monkeypatch.setenv(prec.ENV, "half")
    with pytest.raises(UserError, match=r"^NANOCHAT_PRECISION='half' is not one of fp32, bf16"):
        prec.resolve("auto")
    with pytest.raises(UserError, match="trainer.precision='16-mixed' is not supported"):
        prec.from_lightning("16-mixed")


@pytest.mark.parametrize("trainer", ["cpu", "1xgpu", "8xh100"])
def test_every_trainer_preset_takes_the_precision_key(no_env, trainer, monkeypatch):
    native(monkeypatch, False)
    for requested, env, expected in [
        ("bf16", None, "bf16-mixed"),
        ("fp32", "bf16", "32-true"),
        ("auto", "bf16", "bf16-mixed"),
        ("auto", None, "32-true"),
    ]:
        if env:
            monkeypatch.setenv(prec.ENV, env)
        else:
            monkeypatch.delenv(prec.ENV, raising=False)
        cfg = compose([f"trainer={trainer}", f"precision={requested}"])
        assert cfg.trainer.precision == expected, (requested, env)
        # Muon's Newton-Schulz follows the run, so precision=fp32 under NANOCHAT_PRECISION=bf16 stays all fp32
        assert cfg.module.optimizer.ns_dtype == ("bfloat16" if expected == "bf16-mixed" else "float32")
    assert compose([f"trainer={trainer}", "trainer.precision=32-true"]).module.optimizer.ns_dtype == "float32"
    # trainer.precision set by hand still wins, and the start-up line says so
    assert str(prec.of_trainer("bf16", "cpu", "32-true")) == "precision: fp32 (trainer.precision=32-true)"
    assert prec.of_trainer("bf16", "cpu", "bf16-mixed").reason.startswith("precision=bf16; not native")


def test_newton_schulz_auto_follows_the_same_decision(monkeypatch):
    from nanochat.optim.muon import ns_dtype

    native(monkeypatch, False)
    monkeypatch.setenv(prec.ENV, "bf16")
    assert ns_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv(prec.ENV, "fp32")
    assert ns_dtype("auto", torch.device("cpu")) == torch.float32


# --- one compute dtype ----------------------------------------------------------------------------
def logits(model, ids, dtype):
    with torch.no_grad(), prec.computing(model, dtype):
        return model(ids)


@pytest.fixture
def prompt(tiny_tokenizer):
    return tiny_tokenizer.encode("def fibonacci(n):", prepend="<|bos|>")


def test_cast_weights_keeps_the_residual_stream_and_rotary_in_fp32_and_computes_trainings_numbers(random_model, prompt):
    cast = prec.cast_weights(copy.deepcopy(random_model), torch.bfloat16)
    assert cast.lm_head.weight.dtype == cast.transformer.h[0].attn.c_q.weight.dtype == torch.bfloat16
    assert cast.transformer.wte.weight.dtype == cast.cos.dtype == torch.float32
    assert prec.weights_dtype(cast) == torch.bfloat16 and prec.weights_dtype(random_model) == torch.float32
    ids = torch.tensor([prompt])
    # bf16 weights compute bit for bit what autocast computes over the fp32 master weights
    assert torch.equal(logits(cast, ids, torch.bfloat16), logits(random_model, ids, torch.bfloat16))
    with pytest.raises(
        UserError, match="bfloat16 weights cannot compute in torch.float32; load it with precision=fp32"
    ):
        logits(cast, ids, torch.float32)


def test_bf16_logits_are_within_the_stated_tolerance_of_fp32_and_fp32_ignores_an_outer_autocast(random_model, prompt):
    ids = torch.tensor([prompt])
    fp32 = logits(random_model, ids, torch.float32)
    bf16 = logits(random_model, ids, torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32  # logits are fp32 whatever the compute dtype
    gap = (bf16 - fp32).abs().max() / fp32.abs().max()
    assert 0 < gap < BF16_LOGIT_TOLERANCE
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a trainer's bf16 context around an fp32 engine
        assert torch.equal(logits(random_model, ids, torch.float32), fp32)


def greedy(engine, prompt, n=24):
    return [column[0] for column, _ in engine.generate(prompt, max_tokens=n, temperature=0)]


def test_the_engine_takes_its_dtype_from_the_caller_and_keeps_it_for_the_whole_generation(
    random_model, tiny_tokenizer, prompt
):
    reference = greedy(Engine(random_model, tiny_tokenizer, use_tools=False, dtype=torch.bfloat16), prompt)
    ambient = Engine(random_model, tiny_tokenizer, use_tools=False)
    assert ambient.compute_dtype() == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's bf16-mixed around samples, evaluation, RL
        assert ambient.compute_dtype() == torch.bfloat16
        assert greedy(ambient, prompt) == reference
    # a generation started under autocast and resumed outside it (a CLI's loop), then in another thread (a server)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        steps = ambient.generate(prompt, max_tokens=24, temperature=0)
        tokens = [next(steps)[0][0]]
    tokens.append(next(steps)[0][0])
    worker = threading.Thread(target=lambda: tokens.extend(column[0] for column, _ in steps))
    worker.start()
    worker.join()
    assert tokens == reference
    cast = prec.cast_weights(copy.deepcopy(random_model), torch.bfloat16)
    assert greedy(Engine(cast, tiny_tokenizer, use_tools=False), prompt) == reference  # inference weights: bf16 too


def test_keys_queries_and_values_share_a_dtype_when_autocast_runs_the_norms_in_fp32(
    random_model, tiny_tokenizer, prompt, monkeypatch
):
    """CUDA's autocast policy runs rms_norm in fp32 (CPU's in bf16): the cache must still get bf16 keys and values."""
    reference = greedy(Engine(random_model, tiny_tokenizer, use_tools=False, dtype=torch.bfloat16), prompt)
    plain = gpt_module.norm
    monkeypatch.setattr(gpt_module, "norm", lambda x: plain(x.float()))
    engine = Engine(random_model, tiny_tokenizer, use_tools=False, dtype=torch.bfloat16)
    assert greedy(engine, prompt) == reference
    decoder = BatchDecoder(engine)
    decoder.add(prompt, max_tokens=4, temperature=0)
    assert decoder.cache.k.dtype == decoder.cache.v.dtype == torch.bfloat16


def test_a_bad_precision_stops_a_training_run_with_one_line(tiny_run, stage_error, monkeypatch):
    assert "precision='fp16' is not one of auto, fp32, bf16" in stage_error(compose(tiny_run("precision=fp16")))
    monkeypatch.setenv(prec.ENV, "half")
    assert "NANOCHAT_PRECISION='half' is not one of fp32, bf16" in stage_error(compose(tiny_run()))
