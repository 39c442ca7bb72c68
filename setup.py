"""diverse_cfg: Diversity-Rewarded CFG Distillation in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name='diverse_cfg',
    version='0.1.0',
    description='Diversity-rewarded CFG distillation (Cideron et al., 2024) in JAX/Flax',
    packages=find_packages(include=['diverse_cfg', 'diverse_cfg.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.7,<0.11',
        'flax>=0.11,<0.13',
        'optax>=0.2.4,<0.3',
        'orbax-checkpoint>=0.11,<0.13',
        'ml-collections>=1.0,<2',
        'tensorflow-datasets>=4.9.8,<5',
        'array-record>=0.7',
        'chex>=0.1.90,<0.2',
        'grain>=0.2.12,<0.3',
        'numpy>=1.26,<3',
        'absl-py>=2.1',
        'music21>=9.1,<11',
        'matplotlib>=3.8,<4',
        'tqdm>=4.66',
        'tensorboardX>=2.6',
    ],
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3.5'],
        # The peer benchmark (benchmarks/peer_transformers.py, `make bench-peer`). torch is pinned
        # exactly: 2.13.0 is the CPU-only wheel these machines install from local disk; any range
        # (or a newer torch) resolves to the multi-GB CUDA build from the index.
        'peer': ['torch==2.13.0', 'transformers>=5.24,<6'],
        # examples/italy_power_demand.py reads the UCR data bundled in sktime's wheel.
        'examples': ['sktime==1.2.0'],
        # benchmarks/aot.py: compile for TPU topologies on a machine without a TPU.
        'tpu_aot': ['libtpu==0.0.52'],
    },
    entry_points={'console_scripts': ['diverse-cfg=diverse_cfg.cli:run']},
)
