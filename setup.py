"""Package definition for edropout (engine) and edropout_kernels (Triton kernels)."""
from setuptools import find_packages, setup

setup(
    name="edropout",
    version="0.1.0",
    description="Energy-based pruning (EDropout) for PyTorch, with a reference path and Triton kernels",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["edropout", "edropout.*", "edropout_kernels", "edropout_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "numpy", "torch-pruning>=1.5", "scikit-learn",
                      "matplotlib", "tqdm"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["edropout=edropout.app.cli:main"]},
)
