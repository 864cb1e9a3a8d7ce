"""`python -m training --out DIR ...`: train the shipped model (training/cli.py)."""
from training.cli import main

if __name__ == "__main__":
    main()
