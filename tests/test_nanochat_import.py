"""nanochat's own checkpoints (model_<step>.pt, meta_<step>.json, tokenizer.pkl) imported with `nanochat:<dir>[@step]`,
never running pickled code."""

import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from interop_helpers import fake_hub_cache, train_tiny, write_nanochat_checkpoint

from nanochat.export import find_export, load_export
from nanochat.export.__main__ import main as export_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_tokenizer, one_torch_thread):
    return train_tiny(tiny_tokenizer, steps=20, seed=3)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "nanochat_home"


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        export_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_native_checkpoint_imports_with_identical_logits(model, tiny_tokenizer, home):
    ckpt = write_nanochat_checkpoint(home, model, tiny_tokenizer, step=650)
    export = find_export(f"nanochat:{ckpt}")
    back, tok, meta = load_export(export)
    assert back.config == model.config and tok.same_as(tiny_tokenizer)
    assert (meta["stage"], meta["step"], meta["metrics"]) == ("sft", 650, {"val/bpb": 1.25})
    x = torch.tensor([tiny_tokenizer.encode(t, prepend="<|bos|>") for t in ("Hello there, friend", "def f(x): retur")])
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert tok.encode("Привет 🤖 1984") == tiny_tokenizer.encode("Привет 🤖 1984")


def test_step_selection_and_bf16_weights(model, tiny_tokenizer, home):
    ckpt = write_nanochat_checkpoint(
        home, model, tiny_tokenizer, step=100, stage_dir="base_checkpoints", dtype=torch.bfloat16
    )
    later = train_tiny(tiny_tokenizer, steps=1, seed=9)
    write_nanochat_checkpoint(home, later, tiny_tokenizer, step=200, stage_dir="base_checkpoints")
    latest, _, meta = load_export(find_export(f"nanochat:{ckpt}"))
    assert meta["step"] == 200 and meta["stage"] == "base"
    assert torch.equal(latest.lm_head.weight, later.lm_head.weight)
    first, _, meta = load_export(find_export(f"nanochat:{ckpt}@100"))
    assert meta["step"] == 100
    assert torch.equal(first.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())  # bf16 on disk, exact


def test_a_native_checkpoint_exports_to_transformers(model, tiny_tokenizer, home, tmp_path):
    """nanochat's tokenizer.pkl has no tokenizer.json: the HF tokenizer is built from the ranks and must agree."""
    transformers = pytest.importorskip("transformers")
    ckpt = write_nanochat_checkpoint(home, model, tiny_tokenizer, step=5)
    export_main(["hf", f"nanochat:{ckpt}@5", str(tmp_path / "hf")])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The year 1984 had 365 days; Le cœur a ses raisons. def main():\n    return 0"
    ids = hf_tok(text).input_ids
    assert ids == tiny_tokenizer.encode(text, prepend="<|bos|>")
    with torch.no_grad():
        torch.testing.assert_close(hf_model(torch.tensor([ids])).logits, model(torch.tensor([ids])), atol=1e-4, rtol=0)


def test_a_hub_repo_of_nanochat_files_imports_offline(model, tiny_tokenizer, home, tmp_path, monkeypatch):
    """hf:<owner>/<name> whose repo holds nanochat's own files (model, meta, tokenizer.pkl side by side)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    ckpt = write_nanochat_checkpoint(home, model, tiny_tokenizer, step=650)
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        (ckpt / name).write_bytes((home / "tokenizer" / name).read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "someone/nanochat-d2", ckpt)
    back, _, meta = load_export(find_export("hf:someone/nanochat-d2"))
    assert meta["step"] == 650 and meta["source"]["repo"] == "someone/nanochat-d2"
    x = torch.tensor([tiny_tokenizer.encode("Hello there", prepend="<|bos|>")])
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert find_export(f"hf:{ckpt}") == find_export(f"nanochat:{ckpt}")  # a local dir of nanochat files, either way


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Exploit.marker}",))


def test_a_pickle_holding_anything_but_an_encoding_is_refused_unopened(model, tiny_tokenizer, home, tmp_path, capsys):
    ckpt = write_nanochat_checkpoint(home, model, tiny_tokenizer, step=1)
    pkl = home / "tokenizer" / "tokenizer.pkl"
    Exploit.marker = tmp_path / "pwned"
    pkl.write_bytes(pickle.dumps(Exploit()))
    line = one_line_error(capsys, ["import", f"nanochat:{ckpt}"])
    assert "posix.system" in line and "refusing to unpickle" in line and not Exploit.marker.exists()

    pkl.write_bytes(pickle.dumps(OrderedDict(a=1)))
    assert "collections.OrderedDict" in one_line_error(capsys, ["import", f"nanochat:{ckpt}"])

    # What pickling tiktoken's registered "gpt2" encoding writes (a name to look up, which would download it).
    pkl.write_bytes(b"\x80\x02ctiktoken.core\nEncoding\n)\x81X\x04\x00\x00\x00gpt2b.")
    assert "registered encoding 'gpt2'" in one_line_error(capsys, ["import", f"nanochat:{ckpt}"])

    pkl.write_bytes(b"\x80\x04garbage")
    assert "not a readable pickle" in one_line_error(capsys, ["import", f"nanochat:{ckpt}"])


def test_weights_that_are_not_plain_tensors_are_refused(model, tiny_tokenizer, home, capsys):
    ckpt = write_nanochat_checkpoint(home, model, tiny_tokenizer, step=1)
    Exploit.marker = home / "pwned"
    torch.save({"transformer.wte.weight": Exploit()}, ckpt / "model_000001.pt")
    line = one_line_error(capsys, ["import", f"nanochat:{ckpt}"])
    assert "holds more than tensors" in line and not Exploit.marker.exists()


def test_bad_checkpoints_are_refused_with_one_line_each(model, tiny_tokenizer, serving_tokenizer, home, capsys):
    ckpt = write_nanochat_checkpoint(home, model, tiny_tokenizer, step=1)
    assert "no checkpoint of step 7" in one_line_error(capsys, ["import", f"nanochat:{ckpt}@7"])
    assert "subdirectories d2" in one_line_error(capsys, ["import", f"nanochat:{ckpt.parent}"])

    state = torch.load(ckpt / "model_000001.pt", weights_only=True)
    torch.save({**state, "resid_lambdas": torch.ones(2), "x0_lambdas": torch.zeros(2)}, ckpt / "model_000001.pt")
    between = load_export(find_export(f"nanochat:{ckpt}"))[0].config  # a version between the seed era and HEAD
    assert between.layer_lambdas and not between.value_embeds and between.qk_scale == 1.2  # with HEAD's constants

    state["_orig_mod.lm_head.weight"] = torch.zeros(1088, 64)  # a head larger than the model_config's vocabulary
    torch.save(state, ckpt / "model_000001.pt")
    assert "lm_head.weight" in (line := one_line_error(capsys, ["import", f"nanochat:{ckpt}"])) and "(1088, 64)" in line

    ckpt = write_nanochat_checkpoint(home, model, tiny_tokenizer, step=2, window_pattern="SSSL")
    line = one_line_error(capsys, ["import", f"nanochat:{ckpt}@2"])  # HEAD's short window exceeds this context
    assert "window_pattern='SSSL'" in line and "not shorter than the context" in line

    ckpt = write_nanochat_checkpoint(home, model, tiny_tokenizer, step=3, window_pattern="L")  # full context: ours
    assert find_export(f"nanochat:{ckpt}@3").is_dir()

    meta = json.loads((ckpt / "meta_000003.json").read_text())
    meta["model_config"]["vocab_size"] = 2048
    (ckpt / "meta_000003.json").write_text(json.dumps(meta))
    line = one_line_error(capsys, ["import", f"nanochat:{ckpt}@3"])
    assert "1,024 tokens but the checkpoint's vocab_size is 2,048" in line

    write_nanochat_checkpoint(home, model, tiny_tokenizer, step=4)
    torch.save(serving_tokenizer.token_bytes(), home / "tokenizer" / "token_bytes.pt")
    assert "token_bytes.pt does not match" in one_line_error(capsys, ["import", f"nanochat:{ckpt}@4"])

    (home / "tokenizer" / "tokenizer.pkl").unlink()
    assert "no tokenizer.pkl" in one_line_error(capsys, ["import", f"nanochat:{ckpt}@4"])


def test_a_checkpoint_of_nanochats_2026_model_imports_with_identical_logits(home):
    """nanochat HEAD's layout: value embeddings, lambdas, smear, backout, SSSL windows, a vocabulary padded to 64."""
    from conftest import corpus_documents

    from nanochat.export.nanochat_checkpoint import head_architecture
    from nanochat.models.components import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    tok = Tokenizer.train(corpus_documents(), vocab_size=1000, show_progress=False)
    torch.manual_seed(3)
    config = GPTConfig.from_depth(2, tok.vocab_size, 512, head_dim=64, **head_architecture())
    assert config.padded_vocab_size == 1024 and config.value_embeds and config.window_pattern == "SSSL"
    source = GPT(config).eval()  # its own (2026) initialisation
    with torch.no_grad():
        for name in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"):
            getattr(source, name).uniform_(0.1, 1.0)  # no neutral values: every feature counts in the logits
    ckpt = write_nanochat_checkpoint(home, source, tok, step=9, window_pattern="SSSL")
    imported, _, meta = load_export(find_export(f"nanochat:{ckpt}@9"))
    assert imported.config == config and meta["step"] == 9
    x = torch.tensor([tok.encode("Hello there, friend. " * 40, prepend="<|bos|>")[:300]])
    with torch.no_grad():
        assert torch.equal(imported(x), source(x))
