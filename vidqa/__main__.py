"""`python -m vidqa ...`: the same as the `vidqa` command."""

from vidqa.entry import main

if __name__ == "__main__":
    main()
