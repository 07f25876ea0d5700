# The one thing pyproject.toml cannot say: the hit path's C extension. It is
# optional: without a C compiler or Python's headers the install still
# succeeds and shadowd/hotcalls.py uses its Python versions of the calls.
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shadowd._hotcalls",
            sources=["shadowd/_hotcalls.c"],
            extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
            optional=True,
        )
    ]
)
