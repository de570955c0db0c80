"""`python -m varm_merge CONFIG.yml OUT [options]` is `varm-merge run CONFIG.yml OUT [options]`."""

from varm_merge.cli import run_command

if __name__ == "__main__":
    run_command(prog_name="python -m varm_merge")
