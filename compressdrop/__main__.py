"""``python -m compressdrop`` (and ``torchrun ... -m compressdrop train``): the CLI."""

from .cli import main

if __name__ == "__main__":
    main()
