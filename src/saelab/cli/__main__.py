"""`python -m saelab.cli ...` (e.g. under torchrun) runs the saelab command."""

from saelab.cli import main

main()
