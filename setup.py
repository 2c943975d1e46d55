"""Install the AdaPonderLM training system: packages `model`, `data`, `training`, `launcher`."""

from setuptools import setup

setup(
    name="adaponder",
    version="0.1.0",
    description="Training system for AdaPonderLM: gated, token-wise adaptive pondering GPT-NeoX models",
    python_requires=">=3.10",
    packages=["model", "data", "training", "launcher"],
    include_package_data=True,
    package_data={"launcher": ["*.sh"], "training": ["*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.14",
        "deepspeed>=0.16",
        "pyarrow>=14",
        "datasets>=3.0",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff>=0.6"],
        # adaponder-eval --tasks: lm-eval's Hugging Face backend imports accelerate; plots need matplotlib.
        "eval": ["lm-eval>=0.4.13", "accelerate>=1.0", "matplotlib>=3.7"],
        "wandb": ["wandb"],  # logging.wandb_project (DeepSpeed's wandb monitor)
    },
    entry_points={
        "console_scripts": [
            "adaponder-preprocess=data.preprocess:main",
            "adaponder-prepare=data.prepare:main",
            "adaponder-train-tokenizer=data.train_tokenizer:main",
            "adaponder-train=training.pretrain:main",
            "adaponder-quickstart=launcher.quickstart:main",
            "adaponder-generate=launcher.generate:main",
            "adaponder-export=training.export:main",
            "adaponder-eval=training.evaluate:main",
        ],
    },
)
