"""Hugging Face transformers interop: export to NanoChatForCausalLM and back, import by spec wherever a checkpoint is
taken, the Hub (offline: a hand-built cache, a mocked upload) and the model card."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import corpus_documents  # noqa: E402
from interop_helpers import fake_hub_cache, train_tiny  # noqa: E402

from nanochat.engine.engine import Engine  # noqa: E402
from nanochat.export import find_export, load_export, save_export  # noqa: E402
from nanochat.export.__main__ import main as export_main  # noqa: E402
from nanochat.models.components import GPT, GPTConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [
    "The quick brown fox",
    "def parse_args(argv):\n    ",
    "Le cœur a ses raisons",
    "1984 had 365 days; 3.14",
    "Привет, мир! 🤖",
    "import json",
]
CONVERSATION = [  # a system prompt, a tool call with its output, and a second user turn
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12*7?"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me compute "},
            {"type": "python", "text": "12*7"},
            {"type": "python_output", "text": "84"},
            {"type": "text", "text": " so 84."},
        ],
    },
    {"role": "user", "content": "Thanks! And 2+2?"},
]


@pytest.fixture(scope="module")
def trained(tiny_tokenizer, tmp_path_factory, one_torch_thread):
    """(model, tokenizer, export dir) of a tiny GPT trained for 40 steps, exported as the sft stage at step 40."""
    model = train_tiny(tiny_tokenizer)
    export = save_export(
        model,
        tiny_tokenizer,
        tmp_path_factory.mktemp("run") / "export",
        {"stage": "sft", "step": 40, "metrics": {"val/bpb": 1.5}},
    )
    return model, tiny_tokenizer, export


@pytest.fixture(scope="module")
def hf_dir(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny-nanochat"
    export_main(["hf", str(trained[2]), str(out)])
    return out


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        export_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --- export: transformers loads it and computes our numbers --------------------------------------------------------
def test_the_export_is_a_plain_transformers_nanochat_dir(hf_dir, hf_model, trained):
    model = trained[0]
    assert type(hf_model).__name__ == "NanoChatForCausalLM"
    config = json.loads((hf_dir / "config.json").read_text())
    c = model.config
    assert (
        config["hidden_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["intermediate_size"],
        config["max_position_embeddings"],
    ) == (c.n_embd, c.n_layer, c.n_head, c.n_kv_head, 4 * c.n_embd, c.sequence_len)
    assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps  # F.rms_norm's eps for fp32 input
    assert config["final_logit_softcapping"] == 15.0 and config["rope_parameters"]["rope_theta"] == 10_000.0
    assert config["nanochat"] == {"stage": "sft", "step": 40, "metrics": {"val/bpb": 1.5}}
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    tok = trained[1]
    assert generation["eos_token_id"] == [tok.token_id("<|assistant_end|>"), tok.bos_token_id]


def test_transformers_logits_equal_ours_on_a_batch_of_prompts(hf_model, trained):
    model, tok, _ = trained
    rows = [tok.encode(p, prepend="<|bos|>") for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.bos_token_id] * (width - len(r)) for r in rows])  # right-padded batch
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            ours = model(torch.tensor([r]))[0]
            assert ours.dtype == theirs.dtype == torch.float32
            torch.testing.assert_close(theirs[i, : len(r)], ours, atol=1e-4, rtol=0)
            assert ours.std() > 0.1  # a trained model: logits that vary, not a constant head


def test_transformers_greedy_generation_equals_our_engine(hf_model, trained):
    model, tok, _ = trained
    engine = Engine(model, tok, use_tools=False)
    stops = {tok.token_id("<|assistant_end|>"), tok.bos_token_id}
    prompts = [tok.encode(p, prepend="<|bos|>") for p in PROMPTS[:3]] + [tok.render_for_completion(CONVERSATION)]
    for prompt in prompts:
        ours = []
        for column, _ in engine.generate(prompt, max_tokens=24, temperature=0):
            ours.append(column[0])
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=24,
                do_sample=False,
            )
        theirs = out[0, len(prompt) :].tolist()
        if ours[-1] in stops:  # both stop at the end-of-turn / end-of-document token and emit it
            assert theirs == ours
        else:
            assert theirs == ours and len(ours) == 24


def test_autotokenizer_encodes_decodes_and_renders_chats_to_our_ids(hf_dir, trained):
    tok = trained[1]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in PROMPTS + [d[:2000] for d in corpus_documents()]:
        ids = hf_tok(text).input_ids
        assert ids == tok.encode(text, prepend="<|bos|>")  # <|bos|> first, as every training document
        assert hf_tok.decode(ids, skip_special_tokens=True) == text
    rendered = hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert rendered == tok.render_for_completion(CONVERSATION)
    full = hf_tok.apply_chat_template(CONVERSATION[:3], tokenize=True)["input_ids"]
    assert full == tok.render_conversation(CONVERSATION[:3])[0]
    developer = [{"role": "developer", "content": "You are terse."}, *CONVERSATION[1:]]
    assert hf_tok.apply_chat_template(developer, add_generation_prompt=True, tokenize=True)["input_ids"] == rendered
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=False)


def test_ours_to_hf_to_ours_is_bitwise_identical_and_converted_once(hf_dir, trained):
    model, tok, _ = trained
    export = find_export(f"hf:{hf_dir}")
    assert find_export(str(hf_dir)) == export  # a plain path to a transformers dir is imported the same way
    back, back_tok, meta = load_export(export)
    assert back.config == model.config and back_tok.same_as(tok)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (meta["stage"], meta["step"], meta["source"]["path"]) == ("sft", 40, str(hf_dir.resolve()))
    stamp = (export / "model.safetensors").stat().st_mtime_ns
    assert find_export(f"hf:{hf_dir}") == export and (export / "model.safetensors").stat().st_mtime_ns == stamp
    edit_json(hf_dir / "config.json")  # the source changed (rewritten): converted again
    assert find_export(f"hf:{hf_dir}") == export and (export / "model.safetensors").stat().st_mtime_ns != stamp


def test_bf16_export_holds_bf16_weights_that_import_rounded(trained, tmp_path):
    model, _, export = trained
    out = tmp_path / "bf16"
    export_main(["hf", str(export), str(out), "--dtype", "bfloat16"])
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    back, _, _ = load_export(find_export(f"hf:{out}"))
    w = model.transformer.h[0].attn.c_q.weight
    assert torch.equal(back.transformer.h[0].attn.c_q.weight, w.to(torch.bfloat16).float())


# --- import everywhere a checkpoint is taken ---------------------------------------------------------------------
def test_specs_pass_through_hydra_and_the_chat_cli(hf_dir, capsys):
    from nanochat.configs import compose
    from nanochat.serving.chat_cli import main as chat_main

    cfg = compose(["stage=eval", f"ckpt=hf:{hf_dir}"])
    assert cfg.ckpt == f"hf:{hf_dir}"
    cfg = compose(["stage=sft", "init_from=nanochat:/some/home/chatsft_checkpoints/d20@650", "model=d20"])
    assert cfg.init_from == "nanochat:/some/home/chatsft_checkpoints/d20@650"
    chat_main([f"hf:{hf_dir}", "-p", "Hello", "--max-tokens", "4", "--temperature", "0", "--device", "cpu"])
    assert capsys.readouterr().out.strip() != ""


def test_a_stage_inits_from_an_hf_model(tiny_run, tiny_tokenizer, tmp_path):
    """init_from=hf:<dir> as a stage builds it: the weights it starts from are the transformers dir's."""
    from nanochat.configs import compose
    from nanochat.stages.fit import build

    torch.manual_seed(1)
    start = GPT(GPTConfig.from_depth(2, tiny_tokenizer.vocab_size, 16, head_dim=64))  # tiny_run's model
    with torch.no_grad():
        for p in start.parameters():
            p.normal_(0, 0.02)
    hf = tmp_path / "start-hf"
    export_main(["hf", str(save_export(start, tiny_tokenizer, tmp_path / "start" / "export")), str(hf)])
    cfg = compose(
        tiny_run(
            "run=from_hf",
            f"init_from=hf:{hf}",
            "budget.base_steps=1",
            "callbacks=[]",
            "+trainer.enable_checkpointing=false",
        )
    )
    _, module, _, _ = build(cfg)
    for k, v in start.state_dict().items():
        assert torch.equal(module.model.state_dict()[k], v), k
    assert module.parent["export"] == str(find_export(f"hf:{hf}").resolve())


def test_the_eval_stage_takes_an_hf_ckpt(hf_dir, trained, tmp_path, caplog):
    from conftest import write_core_bundle

    from nanochat.configs import compose
    from nanochat.eval.core import evaluate_core
    from nanochat.stages import run_stage
    from nanochat.tasks.core_bundle import load_bundle

    bundle = write_core_bundle(tmp_path / "bundle")
    with caplog.at_level("INFO"):
        run_stage(
            compose(
                [
                    "stage=eval",
                    "eval=core",
                    f"ckpt=hf:{hf_dir}",
                    f"mixture.core_bundle={bundle}",
                    "trainer=cpu",
                    "precision=fp32",
                ]
            )
        )
    expected = evaluate_core(trained[0], trained[1], load_bundle(bundle))["metrics"]["core/score"]
    assert f"CORE score {expected:.4f} over 3 of 22 tasks" in caplog.text


def test_two_processes_importing_one_source_convert_it_once(hf_dir, monkeypatch):
    """Ranks of one run resolve init_from at the same moment: the lock makes the second wait and reuse the first's."""
    import threading
    import time

    from nanochat.export import hf

    convert, calls = hf.import_hf, []

    def slow_convert(*args):
        calls.append(args)
        time.sleep(0.3)
        return convert(*args)

    monkeypatch.setattr(hf, "import_hf", slow_convert)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(hf_dir.parent / "fresh_home"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(find_export(f"hf:{hf_dir}"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]


# --- bad input: one line each --------------------------------------------------------------------------------------
def broken_copy(hf_dir: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(hf_dir, copy)
    return copy


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_bad_hf_dirs_are_refused_with_one_line_each(hf_dir, tmp_path, capsys, serving_tokenizer):
    llama = broken_copy(hf_dir, tmp_path, "llama")
    edit_json(llama / "config.json", model_type="llama")
    assert "'llama' model" in one_line_error(capsys, ["import", str(llama)])

    shapes = broken_copy(hf_dir, tmp_path, "shapes")
    edit_json(shapes / "config.json", num_key_value_heads=4)
    assert "model.layers.0.self_attn.k_proj.weight" in one_line_error(capsys, ["import", f"hf:{shapes}"])

    vocab = broken_copy(hf_dir, tmp_path, "vocab")
    edit_json(vocab / "config.json", vocab_size=2048)
    assert "1,024 tokens but the model's vocab_size is 2,048" in one_line_error(capsys, ["import", f"hf:{vocab}"])

    no_tok = broken_copy(hf_dir, tmp_path, "no_tok")
    (no_tok / "tokenizer.json").unlink()
    assert "has no tokenizer.json" in one_line_error(capsys, ["import", f"hf:{no_tok}"])

    other_tok = broken_copy(hf_dir, tmp_path, "other_tok")  # a nanochat tokenizer, but another model's (600 tokens)
    (other_tok / "tokenizer.json").write_text(serving_tokenizer.hf_tokenizer().to_str())
    assert "600 tokens but the model's vocab_size is 1,024" in one_line_error(capsys, ["import", f"hf:{other_tok}"])

    gpt2_split = broken_copy(hf_dir, tmp_path, "gpt2_split")
    data = json.loads((gpt2_split / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}{1,3}| ?\p{L}+|\s+"
    (gpt2_split / "tokenizer.json").write_text(json.dumps(data))
    assert "not nanochat's pattern" in one_line_error(capsys, ["import", f"hf:{gpt2_split}"])

    tied = broken_copy(hf_dir, tmp_path, "tied")
    edit_json(tied / "config.json", tie_word_embeddings=True)
    assert "tied input and output embeddings" in one_line_error(capsys, ["import", f"hf:{tied}"])

    assert "neither a directory nor a Hugging Face repo id" in one_line_error(capsys, ["import", "hf:no/such/thing"])


@dataclass(frozen=True)
class FutureConfig(GPTConfig):
    """GPTConfig as a later version might have it: a switch NanoChatForCausalLM has no equivalent for."""

    smear: bool = False


@dataclass(frozen=True)
class SelfDescribedConfig(GPTConfig):
    def hf_unsupported(self) -> list[str]:
        return ["value embeddings"]


@pytest.mark.parametrize(
    "config_class, named", [(FutureConfig, "smear=True"), (SelfDescribedConfig, "value embeddings")]
)
def test_export_refuses_features_transformers_lacks(config_class, named, tmp_path, tiny_tokenizer, monkeypatch, capsys):
    from nanochat.models import components

    extra = {"smear": True} if config_class is FutureConfig else {}
    model = GPT(
        config_class(
            vocab_size=tiny_tokenizer.vocab_size, sequence_len=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, **extra
        )
    )
    export = save_export(model, tiny_tokenizer, tmp_path / "export")
    monkeypatch.setattr(components, "GPTConfig", config_class)  # the loader builds the config this version knows
    line = one_line_error(capsys, ["hf", str(export), str(tmp_path / "out")])
    assert named in line and "NanoChatForCausalLM" in line and not (tmp_path / "out").exists()


def test_export_never_overwrites_a_directory_that_is_not_an_hf_export(trained, tmp_path, capsys):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    assert "not a Hugging Face NanoChat export" in one_line_error(capsys, ["hf", str(trained[2]), str(precious)])
    assert (precious / "todo.txt").read_text() == "keep me"


# --- the Hub, offline ------------------------------------------------------------------------------------------------
def test_a_hub_repo_id_resolves_from_the_cache_offline(hf_dir, trained, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: the suite never touches the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "someone/tiny-nanochat", hf_dir)
    export = find_export("hf:someone/tiny-nanochat")
    assert export.parent.name == "someone--tiny-nanochat"
    back, _, meta = load_export(export)
    assert meta["source"]["commit"] == "0123456789abcdef0123456789abcdef01234567"
    x = torch.tensor([trained[1].encode("hello there", prepend="<|bos|>")])
    with torch.no_grad():
        assert torch.equal(back(x), trained[0](x))
    line = one_line_error(capsys, ["import", "hf:someone/not-downloaded"])
    assert "HF_HUB_OFFLINE" in line and "`hf download someone/not-downloaded`" in line


def test_model_card_and_push_to_hub_with_the_upload_mocked(trained, tmp_path, monkeypatch, capsys):
    """The card is built from the run's report card; the upload is huggingface_hub.HfApi, mocked at that boundary
    (a real upload needs a token and the network)."""
    import huggingface_hub

    from nanochat.report import write_section

    model, tok, _ = trained
    run = tmp_path / "runs" / "tiny"
    write_section(run, "base", {"items": {"depth": 2, "total batch size": 512}, "metrics": {"core/score": 0.1234}})
    write_section(run, "sft", {"items": {"init lr fraction": 0.02, "epochs": 1}, "metrics": {"chat/arc_easy": 0.25}})
    write_section(run, "sft-eval", {"items": {}, "metrics": {"chat/arc_easy": 0.3125}})
    save_export(model, tok, run / "sft" / "export", {"stage": "sft", "step": 40})
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "hf"
    line = one_line_error(capsys, ["hf", str(run / "sft"), str(out), "--push-to-hub", "me/tiny-chat"])
    assert "HF_HUB_OFFLINE" in line and (out / "README.md").is_file()  # the folder is built, the upload refused
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    export_main(["hf", str(run / "sft"), str(out), "--push-to-hub", "me/tiny-chat", "--private"])
    assert "pushed to me/tiny-chat: https://huggingface.co/me/tiny-chat/commit/abc" in capsys.readouterr().out
    files = [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert calls == [
        ("create_repo", "me/tiny-chat", {"repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", "me/tiny-chat", files),
    ]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "# me/tiny-chat" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-chat")' in card and "init_from=hf:me/tiny-chat" in card
    assert "| Metric | BASE | SFT |" in card
    assert "| CORE | 0.1234 | - |" in card and "| ARC-Easy | - | 0.3125 |" in card  # the standalone eval wins
    assert "| init lr fraction | 0.0200 |" in card and "| total batch size | 512 |" in card
    assert f"d{model.config.n_layer}: width {model.config.n_embd}" in card
