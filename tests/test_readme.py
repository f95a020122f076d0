"""The README's two commands are the ones that exist and that CI runs."""

import re
import subprocess

from conftest import EXAMPLE_DATA, ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(make quickstart.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make quickstart", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_make_targets_resolve():
    for target in ("quickstart", "test"):
        out = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "constraints.txt" in out.stdout


def test_example_data_goes_through_the_pipeline(smol_tokenizer):
    from xtuner_lite import process_dataset

    alpaca = process_dataset(
        EXAMPLE_DATA / "alpaca_mini.json",
        smol_tokenizer,
        map_fn="alpaca",
        template="smollm2",
        use_cache=False,
    )
    chat = process_dataset(
        EXAMPLE_DATA / "chat_mini.jsonl",
        smol_tokenizer,
        map_fn="openai",
        template="smollm2",
        use_cache=False,
    )
    assert alpaca.stats.samples == 8 and chat.stats.samples == 2
    assert chat.stats.trained_tokens < chat.stats.tokens
