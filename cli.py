"""Run the compressdrop CLI from a checkout: ``python cli.py --help``."""

from compressdrop.cli import main

if __name__ == "__main__":
    main()
