"""Rebuild the shipped demo models: python -m edgevlm.demo train [--out DIR] [--seed 0]"""

if __name__ == "__main__":
    from edgevlm.train.demo import main  # the recipe needs torch: an entry point, like the CLI

    main()
