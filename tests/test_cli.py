"""The `speckv` CLI as a user runs it: clear errors with a non-zero exit, JSON output on a local model dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speckv.models import DEFAULT_TARGET, ModelError, resolve_model_dir

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "speckv.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "hi", "--policy", "fastest"], "unknown policy"),
    (["generate", "--prompt", "hi", "--policy", "fixed:0"], "fixed γ must be in"),
    (["generate", "--prompt", "hi", "--policy", "fixed:x"], "needs an integer"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "positive integer"),
    (["generate", "--prompt", "hi", "--tier", "int3"], "invalid choice"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "number >= 0"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "--prompt", "   "], "--prompt is empty"),
    (["generate", "--prompt", "hi", "--device", "gpu"], "unknown device 'gpu'"),
    (["generate", "--prompt", "hi", "--device", "cuda:99"], "device 'cuda:99'"),  # no GPU here; 99 nowhere
    (["generate"], "required: --prompt"),
    (["bench", "--prompts", "/nonexistent.jsonl"], "does not exist"),
    (["bench", "--prompts", "README.md", "--policies", "none,none"], "name one twice"),
    (["bench", "--prompts", "README.md", "--policies", "fixed:2,oracle"], "needs temperature 0 and `none`"),
    (["bench", "--prompts", "README.md", "--policies", "none,oracle", "--temperature", "0.5"], "needs temperature 0"),
    (["generate", "--prompt", "hi", "--predictor", "/nonexistent/predictor.json"], "cannot read predictor"),
    (["collect", "--prompts", "/nonexistent.jsonl"], "does not exist"),
    (["collect", "--prompts", "README.md", "--gammas", "0"], "every value must be in [1, 24]"),
    (["collect", "--prompts", "README.md", "--tiers", "int3"], "unknown tier"),
    (["signals", "--prompts", "/nonexistent.jsonl"], "does not exist"),
    (["signals", "--prompts", "README.md", "--max-new-tokens", "0"], "positive integer"),
    (["train", "--records", "/nonexistent.jsonl"], "does not exist"),
    (["train", "--records", "README.md"], "not a step record"),
    (["train", "--format", "speckv-paper", "--records", "README.md"], "lacks the paper's columns"),
    (["evaluate", "--records", "README.md"], "not a step record"),
    (["cost", "--check-live", "/nonexistent.jsonl"], "does not exist"),
    (["cost", "--check-live", "README.md", "--live-policy", "none"], "needs a policy that always drafts"),
])
def test_bad_input_gives_clear_error_and_nonzero_exit(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_output_to_a_reader_that_stops_reading_ends_quietly():
    """`speckv report results.json | head` printed a BrokenPipeError traceback once head had its lines."""
    proc = subprocess.Popen([sys.executable, "-m", "speckv.cli", "report",
                             "docs/results/epyc/bench_fp16_greedy.json"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before anything is written
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_bad_prompts_file(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"question_id": 1, "category": "qa"}\n')
    proc = run_cli("bench", "--prompts", str(bad), "--policies", "none")
    assert proc.returncode == 2 and "p.jsonl:1" in proc.stderr and "Traceback" not in proc.stderr


def test_signals_needs_prompts_in_both_splits_before_loading_models(tmp_path):
    from speckv.tools.training import split_of

    one = tmp_path / "p.jsonl"
    qid = next(f"q{i}" for i in range(100) if split_of(f"q{i}") == "train")
    one.write_text(json.dumps({"question_id": qid, "category": "qa", "turns": ["hi"]}) + "\n")
    proc = run_cli("signals", "--prompts", str(one), env={"SPECKV_HOME": str(tmp_path)})  # no models there
    assert proc.returncode == 2 and "both the train and the test split" in proc.stderr, proc.stderr


def test_unprepared_default_model_says_what_to_run(tmp_path):
    proc = run_cli("generate", "--prompt", "hi", env={"SPECKV_HOME": str(tmp_path)})
    assert proc.returncode == 2 and "speckv models prepare" in proc.stderr and "Traceback" not in proc.stderr


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelError, match="without config.json"):
        resolve_model_dir(str(tmp_path))
    proc = run_cli("generate", "--prompt", "hi", "--draft", str(tmp_path), "--target", str(tmp_path))
    assert proc.returncode == 2 and "without config.json" in proc.stderr


def test_generate_json_on_local_model_directories(tmp_path, drafting_predictor):
    """A local directory goes through the same loading path as the embedded defaults and hub ids."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    try:
        tok_dir = resolve_model_dir(DEFAULT_TARGET)
    except ModelError:
        pytest.fail("the default models must be prepared before the tests (`speckv models prepare`)")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    dirs = []
    # the target several times the draft's size, so drafting pays whatever the calibration measures (of the same
    # size, a draft token cost about a target pass, and in a fresh-clone CI run adaptive measured that it did
    # not pay and never drafted)
    for seed, name, hidden, layers in [(0, "target", 128, 4), (1, "draft", 32, 1)]:
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             eos_token_id=tokenizer.eos_token_id)
        model = Qwen2ForCausalLM(config)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        dirs.append(str(tmp_path / name))
    common = ["generate", "--prompt", "Say hi", "--chat", "--target", dirs[0], "--draft", dirs[1],
              "--dtype", "float32", "--max-new-tokens", "12", "--json"]
    outs = {}
    for policy in ["none", "fixed:3", "adaptive", "hf-assisted"]:
        # adaptive with a predictor certain of acceptance, so it drafts on any costs
        extra = ["--predictor", str(drafting_predictor / "predictor.json")] if policy == "adaptive" else []
        proc = run_cli(*common, "--policy", policy, *extra)
        assert proc.returncode == 0, proc.stderr
        outs[policy] = json.loads(proc.stdout)
    for key in ["text", "token_ids", "new_tokens", "seconds", "tokens_per_s", "tokens_per_step", "speculation",
                "records"]:
        assert key in outs["fixed:3"], key
    assert outs["fixed:3"]["token_ids"] == outs["none"]["token_ids"] == outs["hf-assisted"]["token_ids"]
    assert outs["adaptive"]["token_ids"] == outs["none"]["token_ids"]
    assert outs["adaptive"]["speculation"]["policy"] == "adaptive"
    for policy in ("fixed:3", "adaptive"):  # both really drafted
        assert sum(r["gamma"] for r in outs[policy]["records"]) > 0, policy
    assert sum(r["gamma"] for r in outs["none"]["records"]) == 0
    assert len(outs["fixed:3"]["records"]) == outs["fixed:3"]["speculation"]["steps"]
