"""Train `tinystories-mini`: a small GPT-Neo and its own byte-level BPE tokenizer, on TinyStories.

`python -m training base-lm [--help]`. The pipeline:

1. read the stories (`training.stories`), hold out every 10th one for validation;
2. train a byte-level BPE tokenizer (vocab ~4k, `<|endoftext|>` as BOS/EOS/PAD) on the train stories;
3. tokenize each story, append `<|endoftext|>`, and pack the stream into blocks of `--context` tokens
   (re-shuffled story order every epoch, fixed by the seed);
4. train a GPT-Neo (TinyStories-33M's layout, scaled down) with AdamW, linear warm-up and cosine decay,
   evaluating the held-out stories every `--eval-every` steps and keeping the weights with the best
   validation loss;
5. every `--save-every` steps write the training state (weights and AdamW moments in safetensors, the
   step, RNG and data position in JSON) atomically to `--run-dir`; `--resume` continues from the latest;
6. export a standard Hugging Face folder (config, safetensors weights, tokenizer) with a model card,
   `train_log.csv` and a loss curve to `--output-dir`.

Everything is deterministic given the seed (and the number of CPU threads).

config.py        BaseLMConfig (the flags) and its checks
tokenizer.py     the byte-level BPE tokenizer and story encoding
data.py          stories per source, their split, packed training / validation blocks
model.py         GPT-Neo construction, AdamW, LR schedule, fast attention, loss and evaluation
checkpoints.py   resumable run checkpoints (safetensors + JSON), written atomically
train.py         the training loop (resume, evaluation, time budget)
card.py          the exported Hugging Face folder and its model card
cli.py           `python -m training base-lm`
"""
