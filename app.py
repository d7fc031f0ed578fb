"""SAE explorer: type a story, see which sparse-autoencoder latents fire, how they appear across widths, and
what editing one changes. The Hugging Face Spaces entry point (`python app.py`; `python app.py --help`).

Everything lives in the `explorer` package; this file only parses the arguments, builds and launches.
"""

from explorer.serve import main

if __name__ == "__main__":
    main()
