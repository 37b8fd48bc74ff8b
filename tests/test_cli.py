"""The command line: every subcommand listed, thin over the library, errors as one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from flexolmo.cli import COMMANDS, main


def test_help_lists_every_command_with_one_line(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    lines = capsys.readouterr().out.splitlines()
    for command in COMMANDS:
        matching = [line for line in lines if line.strip().startswith(command + " ")]
        assert len(matching) == 1 and len(matching[0].split(command, 1)[1].strip()) > 10, command


def test_library_errors_become_one_line_and_exit_1(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flexolmo", "eval", "--model", str(tmp_path / "nowhere"),
                             "--data", "x=y.jsonl"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"flexolmo eval: error: {tmp_path / 'nowhere'}: no such directory; check the path"]


def subcommand_parsers():
    from flexolmo.cli import build_parser

    return build_parser().commands


def test_every_subcommand_shows_its_defaults_and_documents_every_option():
    from flexolmo.cli.common import HelpFormatter

    for name, parser in subcommand_parsers().items():
        assert parser.formatter_class is HelpFormatter, name
        text = " ".join(parser.format_help().split())  # unwrapped, so a default split over two lines still reads
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings}: no help text"
            assert "(default" not in action.help, f"{name} {action.option_strings}: a default written by hand"
            default = action.default
            if default is None or default is False or default == [] or default == "":
                continue
            flag = action.option_strings[0]
            assert f"(default: {default})" in text.split(flag, 1)[1], f"{name} {flag}: default {default} not shown"


def test_a_wrong_flag_prints_the_subcommands_usage(capsys):
    try:
        main(["eval", "--model", "m", "--data", "d.jsonl", "--no-such-flag"])
    except SystemExit as exit_:
        assert exit_.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: flexolmo eval ")
    assert err.strip().endswith("unrecognized arguments: --no-such-flag")


@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: this torch build has no CUDA support"),
    ("cuda:3", "--device cuda:3: this torch build has no CUDA support"),
    ("gpu0", "--device gpu0: not a torch device; use cpu, cuda or cuda:N"),
])
def test_an_unavailable_device_is_one_line_before_any_work(device, message, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    # The model does not exist: the device is refused first, before anything is read.
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--device", device]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flexolmo generate: error: {message}")


@pytest.mark.parametrize("flag", ["--seq-len", "--batch-size", "--max-sequences"])
def test_eval_settings_below_one_are_one_line_errors(flag, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--data", "x.jsonl", flag, "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flexolmo eval: error: {flag}: input should be greater than or equal to 1 (got 0)"]


def test_init_router_seq_len_zero_is_a_one_line_error(tiny_anchor, corpora, capsys):
    assert main(["init-router", "--anchor", str(tiny_anchor), "--public-data", str(corpora["public"]),
                 "--seq-len", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flexolmo init-router: error: --seq-len (0) and --sequences (256) must be at least 1"]


def test_init_router_refuses_to_replace_rows_unless_forced(tiny_anchor, corpora, tmp_path, capsys):
    import shutil

    from flexolmo.model.anchor import compute_fingerprint

    anchor = tmp_path / "anchor"
    shutil.copytree(tiny_anchor, anchor)
    before = compute_fingerprint(anchor)
    args = ["init-router", "--anchor", str(anchor), "--public-data", str(corpora["public"]), "--seq-len", "32",
            "--sequences", "8"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "already has public router rows" in err and "--force" in err and compute_fingerprint(anchor) == before
    assert main([*args, "--force"]) == 0
    after = compute_fingerprint(anchor)
    captured = capsys.readouterr()
    assert after != before and after in captured.out and f"the fingerprint was {before}" in captured.err
    # The rows written are the unit mean FFN inputs of the public text, and the anchor now ships them.
    from flexolmo.data.tokens import load_token_stream
    from flexolmo.model.anchor import load_anchor
    from flexolmo.model.router_init import load_public_rows, mean_direction_rows

    loaded = load_anchor(anchor)
    stream = load_token_stream([corpora["public"]], loaded.tokenizer, split="all")
    expected = mean_direction_rows(loaded.model, stream, 32, 8)
    written = load_public_rows(anchor, len(expected))
    assert all(torch.allclose(row, want, atol=1e-6) for row, want in zip(written, expected))
    assert loaded.fingerprint == after


def test_eval_names_each_file_as_a_domain_and_says_where_the_json_went(tiny_anchor, corpora, tmp_path, capsys):
    import json

    code = tmp_path / "code.heldout.jsonl"
    code.write_text(corpora["code"].read_text())
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_anchor), "--data", str(code), f"pub={corpora['public']}",
                 "--seq-len", "32", "--max-sequences", "2", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert list(written["domains"]) == ["code", "pub"]
    assert f"wrote results: {out}" in capsys.readouterr().out.splitlines()
    # The numbers are those of scoring the same windows in the library.
    from flexolmo.data.tokens import load_token_stream
    from flexolmo.evaluation.scoring import score_stream
    from flexolmo.model.anchor import load_pretrained, load_tokenizer

    model, tokenizer = load_pretrained(tiny_anchor), load_tokenizer(tiny_anchor)
    for name, file in (("code", code), ("pub", corpora["public"])):
        score = score_stream(model, load_token_stream([file], tokenizer, split="all"), 32, max_sequences=2)
        assert written["domains"][name] == pytest.approx(score.as_dict(), rel=1e-6), name
        assert written["domains"][name]["tokens"] == 2 * 32


def test_generate_labels_the_prompt_and_the_continuation(tiny_anchor, capsys):
    assert main(["generate", "--model", str(tiny_anchor), "--prompt", "the river", "--max-new-tokens", "4",
                 "--dtype", "bfloat16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["prompt:", "the river", "continuation:"] and len(lines) == 4


def test_a_task_that_needs_the_hub_is_one_line_listing_the_offline_ones(tiny_anchor, capsys):
    assert main(["eval-tasks", "--model", str(tiny_anchor), "--tasks", "mmlu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mmlu need the Hugging Face hub" in err[0] and "arc_easy" in err[0]


def test_commands_print_no_third_party_noise(tiny_anchor, tmp_path):
    """Run from a directory outside any git repository, as a user would: no `fatal: not a git repository`
    from lm-eval, no tqdm bar from transformers or lm-eval, only flexolmo's own lines."""
    result = subprocess.run([sys.executable, "-m", "flexolmo", "eval-tasks", "--model", str(tiny_anchor),
                             "--tasks", "arc_easy", "--limit", "2"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent),
                                 "HF_DATASETS_CACHE": str(tmp_path / "datasets")})  # a first run builds it
    assert result.returncode == 0, result.stderr
    for noise in ("fatal:", "it/s", "Loading weights", "Running loglikelihood", "Warning", "warn"):
        assert noise not in result.stderr + result.stdout, noise
