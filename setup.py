"""xtuner_lite: memory-efficient LLM fine-tuning (LoRA, QLoRA, full) that also runs on CPU."""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements(name: str) -> list[str]:
    lines = Path(__file__).parent.joinpath("requirements", name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="xtuner_lite",
    version="0.1.0",
    description="Memory-efficient LLM fine-tuning in the XTuner tradition, CPU included",
    long_description=Path(__file__).parent.joinpath("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["xtuner_lite", "xtuner_lite.*"]),
    # the bundled configs, example data and kernel source (not Python packages) ship in the wheel
    package_data={
        "xtuner_lite": [
            "configs/**/*.py",
            "examples/data/*",
            "examples/tasks/*",
            "inference/csrc/*.cpp",  # our decode kernel, built on first use
            "inference/csrc/*.h",
        ]
    },
    install_requires=_requirements("runtime.txt"),
    extras_require={
        "tests": _requirements("tests.txt") + _requirements("data.txt") + _requirements("ray.txt"),
        "data": _requirements("data.txt"),
        "ray": _requirements("data.txt") + _requirements("ray.txt"),
        "deepspeed": _requirements("deepspeed.txt"),
        "lmdeploy": _requirements("lmdeploy.txt"),
    },
    entry_points={"console_scripts": ["xtuner=xtuner_lite.cli:main"]},
)
