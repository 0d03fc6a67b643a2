"""optc: a compiler-style optimisation toolchain for transformer language models on edge hardware.

Kept import-light on purpose: `import optc.runtime` must not pull in the compiler's dependencies.
"""

__version__ = "0.1.0"
