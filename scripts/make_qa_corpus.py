"""Write the fact-QA LM's training text (see hmst/qa.py): train.txt and val.txt."""

from hmst.qa import main

if __name__ == "__main__":
    main()
