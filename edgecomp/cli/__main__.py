"""``python -m edgecomp.cli``: the same as the ``edgecomp`` command."""

from edgecomp.cli import main

if __name__ == "__main__":
    main()
