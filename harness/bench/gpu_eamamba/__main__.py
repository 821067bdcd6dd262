"""``python -m harness.bench.gpu_eamamba``."""

from harness.bench.gpu_eamamba.cli import main

main()
