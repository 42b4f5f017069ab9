"""``python -m gemma2_convert``: the gemma2-convert command."""

from gemma2_convert.cli.main import main

main()
