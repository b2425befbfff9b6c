"""The `fuselm` command as a user runs it: real subprocesses, real models."""

from __future__ import annotations

import json

import pytest

from fuselm.models import llamacpp

from .conftest import requires_bundled, run_cli, run_cli_here


def one_line_error(proc) -> str:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fuselm: error:")
    return lines[0]


def test_unknown_model_did_you_mean():
    err = one_line_error(run_cli("generate", "--model", "smollm2-13m", "hi"))
    assert "did you mean 'smollm2-135m'" in err.lower()


def test_unknown_method_did_you_mean(tiny_dirs):
    d = next(iter(tiny_dirs.values()))
    err = one_line_error(run_cli_here("generate", "--model", str(d), "--method", "singel", "hi"))
    assert "did you mean 'single'" in err.lower()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "1.5"], "top_p"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--stop", ""], "stop"),
    ],
)
def test_invalid_options(tiny_dirs, flags, needle):
    d = next(iter(tiny_dirs.values()))
    err = one_line_error(run_cli_here("generate", "--model", str(d), *flags, "hi"))
    assert needle in err


def test_missing_and_corrupt_files(tmp_path):
    err = one_line_error(run_cli("generate", "--model", str(tmp_path / "nope.gguf"), "hi"))
    assert "not found" in err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    err = one_line_error(run_cli("generate", "--model", str(bad), "--backend", "llamacpp", "hi"))
    assert "bad.gguf" in err
    err = one_line_error(run_cli("generate", "--model", str(tmp_path), "hi"))
    assert "config.json" in err


def test_bundled_model_not_installed_names_the_extra():
    from fuselm.errors import FuselmError
    from fuselm.models import assets
    from fuselm.models.catalog import BundledModel

    ghost = BundledModel(
        name="ghost",
        architecture="llama",
        vocab_size=1,
        chat_template=False,
        extra="models",
        gguf_name="ghost-never-assembled.gguf",
        sha256="0" * 64,
        parts=(
            ("fuselm_no_such_package_part1", "data/part01.bin"),
            ("fuselm_no_such_package_part2", "data/part02.bin"),
        ),
    )
    with pytest.raises(FuselmError, match=r"pip install 'fuselm\[models\]'"):
        assets.ensure_gguf(ghost)


def test_prompt_longer_than_context(tiny_dirs):
    d = next(iter(tiny_dirs.values()))  # tiny models have a 512-token context
    err = one_line_error(run_cli("generate", "--model", str(d), "--raw", "word " * 3000))
    assert "longer than the context" in err


def test_debug_shows_traceback():
    proc = run_cli("--debug", "generate", "--model", "smollm2-13m", "hi")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_generate_json_shape(tiny_dirs):
    d = tiny_dirs.get("llama") or next(iter(tiny_dirs.values()))
    proc = run_cli("generate", "--model", str(d), "--raw", "--max-new-tokens", "5", "--json", "Hello")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"text", "models", "method", "stats"} <= set(out)
    assert out["method"] == "single" and out["models"] == [d.name]
    st = out["stats"]
    assert 1 <= st["new_tokens"] <= 5
    assert st["seconds"] > 0 and st["tokens_per_second"] > 0
    assert st["forward_passes"][d.name] >= 1


def test_config_file_and_flag_override(tiny_dirs, tmp_path):
    d = tiny_dirs.get("qwen2") or next(iter(tiny_dirs.values()))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"models:\n  - name: {d}\ngeneration:\n  max_new_tokens: 3\n  chat: raw\n")
    proc = run_cli("generate", "--config", str(cfg), "--json", "Hello")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["new_tokens"] <= 3
    proc = run_cli("generate", "--config", str(cfg), "--max-new-tokens", "7", "--json", "Hello")
    out = json.loads(proc.stdout)
    assert out["stats"]["new_tokens"] == 7 or out["finish_reason"] in {"eos", "stop"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"models:\n  - name: {d}\n    colour: red\n")
    err = one_line_error(run_cli_here("generate", "--config", str(bad), "Hello"))
    assert "models.0.colour: unknown key (known: " in err and "weight" in err
    # a misspelt key, nested or a method option, gets the closest known one
    bad.write_text(f"models:\n  - name: {d}\ngeneration:\n  max_new_token: 3\n")
    err = one_line_error(run_cli_here("generate", "--config", str(bad), "Hello"))
    assert "generation.max_new_token: unknown key; did you mean 'max_new_tokens'?" in err
    err = one_line_error(
        run_cli_here("generate", "--model", str(d), "--method", "fixed-span", "-O", "polcy=x", "Hello")
    )
    assert "options of method 'fixed-span': polcy: unknown key; did you mean 'policy'?" in err
    err = one_line_error(
        run_cli_here("generate", "--model", str(d), "--method", "fixed-span", "-O", "anchor=0", "Hello")
    )
    assert err.endswith("options of method 'fixed-span': anchor needs policy anchored (-O policy=anchored)")


def test_stop_strings_and_stdin_prompt(tiny_dirs):
    d = tiny_dirs.get("llama") or next(iter(tiny_dirs.values()))
    full = json.loads(
        run_cli(
            "generate", "--model", str(d), "--raw", "--max-new-tokens", "12", "--json", "-", input="Once upon"
        ).stdout
    )
    text = full["text"]
    if len(text) < 3:
        pytest.skip("tiny model ended immediately")
    stop = text[1:3]
    cut = json.loads(
        run_cli(
            "generate", "--model", str(d), "--raw", "--max-new-tokens", "12", "--stop", stop, "--json", "Once upon"
        ).stdout
    )
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.index(stop)]
    streamed = run_cli("generate", "--model", str(d), "--raw", "--max-new-tokens", "12", "--stop", stop, "Once upon")
    assert streamed.stdout == cut["text"] + "\n"


def test_models_command_lists_bundled():
    proc = run_cli("models")
    assert proc.returncode == 0
    for name in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        assert name in proc.stdout


@pytest.mark.integration
@requires_bundled("smollm2-135m")
@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
def test_smollm2_knows_paris(backend):
    if backend == "llamacpp" and not llamacpp.available():
        pytest.skip("llama-cpp-python not installed")
    proc = run_cli(
        "generate",
        "--model",
        "smollm2-135m",
        "--backend",
        backend,
        "--max-new-tokens",
        "40",
        "What is the capital of France?",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_results_matrix_lists_the_evaluation_commands(tmp_path):
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "research" / "results_matrix.py"
    run = subprocess.run(
        [sys.executable, str(script), "--list", "--root", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    commands = [shlex.split(line) for line in run.stdout.splitlines()]
    tasks = {c[c.index("--task") + 1] for c in commands}
    assert tasks == {"nq", "triviaqa", "squad", "gsm8k", "flores-en-de", "flores-de-en", "flores-en-ro", "humaneval"}
    routed = {c[c.index("--task") + 1] for c in commands if "fusionroute" in c}
    assert routed == {"nq", "triviaqa", "gsm8k", "humaneval"}  # the FusionRoute issue's tasks
    assert all(c[:2] == ["fuselm", "eval"] and c[c.index("--out") + 1].startswith(str(tmp_path)) for c in commands)
    limits = {c[c.index("--task") + 1]: c[c.index("--limit") + 1] for c in commands if "--limit" in c}
    assert limits["nq"] == "200" and limits["gsm8k"] == "100" and "humaneval" not in limits
    bad = subprocess.run([sys.executable, str(script), "--list", "--tasks", "nq,gsmk"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown: gsmk" in bad.stderr
