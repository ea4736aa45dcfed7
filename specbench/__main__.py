"""`python -m specbench` = the `specbench` command."""

from specbench.cli import main

main()
