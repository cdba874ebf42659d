"""The README and the `--help` texts stay true: every ```python block of README.md runs as pasted (each in
a fresh namespace; the blocks' own asserts check what they claim), and every number an option's help
quotes as its default is the default the code uses."""
import argparse
import inspect
import re
from pathlib import Path

import pytest

import diffusion_ext
from diffusion_ext import demo
from diffusion_ext.cli import build_parser
from diffusion_ext.data.image_folder import ImageFolderDataset
from diffusion_ext.sampling import make as make_sampler
from diffusion_ext.schedule import NoiseSchedule
from diffusion_ext.train import TrainConfig, model_spec

README = Path(diffusion_ext.__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block of README.md."""
    blocks, code, start = [], None, 0
    for n, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if code is None and line.strip() == "```python":
            code, start = [], n + 1
        elif code is not None and line.strip() == "```":
            blocks.append((start, "\n".join(code) + "\n"))
            code = None
        elif code is not None:
            code.append(line)
    assert code is None, f"README.md: the ```python block at line {start} is not closed"
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4   # schedule ops, low-level ops, group norm, attention


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_python_block_runs_as_pasted(line, code):
    # compiled under its place in README.md, so a failure's traceback points at the README's line
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), {"__name__": "__readme__"})


# ---------------------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------------------
def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _train_default(dest: str):
    """What train uses when the option is left out (its parser passes only given options to TrainConfig)."""
    pixel = model_spec(TrainConfig(task="pixel"), None)[1]
    vae = model_spec(TrainConfig(task="vae"), None)[1]
    special = {
        "channel_mults": {tuple(pixel["channel_mults"]), tuple(vae["channel_mults"])},   # UNet; VAE
        "attention_resolutions": {tuple(pixel["attention_resolutions"])},               # at 64×64
        "max_bad_fraction": {inspect.signature(ImageFolderDataset).parameters["max_bad_fraction"].default},
    }
    return special.get(dest, {getattr(TrainConfig(), dest)})


def _numbers(value) -> tuple[float, ...] | None:
    """'1,2,2,2' -> (1.0, 2.0, 2.0, 2.0); 64 -> (64.0,); a string that is no number: None."""
    if isinstance(value, str):
        return tuple(float(p) for p in value.split(","))
    if isinstance(value, (tuple, list)):
        return tuple(float(v) for v in value)
    return (float(value),) if isinstance(value, (int, float)) else None


QUOTED = re.compile(r"\bdefault:? (-?\d[\d.e+-]*(?:,\d+)*)")


def test_every_default_a_help_quotes_is_the_one_used():
    checked = []
    for name, parser in _commands().items():
        for action in parser._actions:
            for m in QUOTED.finditer(action.help or ""):
                quoted = _numbers(m.group(1))
                if name == "sample" and action.dest == "steps":  # "default: 50 for ddim, 20 for dpmpp_2m ..."
                    actual = {make_sampler("ddim", NoiseSchedule(1000)).default_steps()}
                    for sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
                        n = make_sampler(sampler, NoiseSchedule(1000)).default_steps()
                        assert f"{n} for dpmpp_2m" in action.help, (sampler, n, action.help)
                elif name == "demo" and action.dest == "steps":
                    actual = set(demo.DEMO_STEPS.values())
                elif action.default not in (None, argparse.SUPPRESS):
                    actual = {action.default}
                else:
                    assert name == "train", f"{name} {action.option_strings}: help quotes a default, it has none"
                    actual = _train_default(action.dest)
                assert any(_numbers(a) == quoted for a in actual), \
                    f"{name} {action.option_strings[0]}: help says default {m.group(1)}, the code uses {actual}"
                checked.append((name, action.dest))
    assert len(checked) >= 30 and ("train", "steps") in checked and ("sample", "num") in checked


def test_the_demo_description_quotes_its_budget():
    text = _commands()["demo"].description
    steps, batch = re.search(r"(\d+) steps of batch (\d+)", text).groups()
    assert {int(steps)} == set(demo.DEMO_STEPS.values()) and int(batch) == demo.DEMO_BATCH
    assert "few minutes" in text and "few minutes" in README.read_text(encoding="utf-8").split("<!-- main-command")[0]
