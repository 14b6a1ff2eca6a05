"""``python -m bitro`` runs the command line."""

from bitro._cli import main

if __name__ == "__main__":
    main()
