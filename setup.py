from setuptools import find_packages, setup

setup(
    name="hmst",
    version="0.1.0",
    description="Hierarchical Memory-State Transformer: sparse MoE LM with memory",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hmst", "hmst.*"]),
    package_data={"hmst.observe": ["trace_schema.json"], "hmst.kernels": ["gemv.c"]},
    install_requires=[
        "torch>=2.5",
        "accelerate>=1.0",
        "tokenizers>=0.20",
        "safetensors>=0.4.3",
        "numpy>=1.24",
        "tqdm>=4.60",
        "faiss-cpu>=1.8",
        "PyYAML>=6.0",
    ],
    extras_require={
        "data": ["datasets>=2.19"],
        "dev": [
            "pytest>=8",
            "black>=24",
            "flake8>=7",
            "transformers>=5.0",
            "pexpect>=4.8",
            "jsonschema>=4.18",
            "matplotlib>=3.8",
        ],
        "8bit": ["bitsandbytes>=0.45"],
        # Needs nvcc and a CUDA torch; without it the pure-PyTorch scan is used.
        "mamba": ["mamba-ssm>=2.2", "causal-conv1d>=1.4"],
        # Install with DS_BUILD_OPS=0 (ops JIT-build on first use).
        "deepspeed": ["deepspeed>=0.15"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        "plot": ["matplotlib>=3.8"],
    },
)
