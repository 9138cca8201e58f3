"""A tiny random Llama (HF directory with a byte-level BPE tokenizer) that the tests run instead of a real LLM.

Like Llama, the tokenizer adds ``<s>`` in front, has ``</s>`` as EOS and no pad token. Any text
tokenizes (byte-level), and the words of the prompt templates are single or few tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
TOKENIZER_VOCAB = 512

# Fixed training text: the words of the prompt templates, the labels, and plain English.
CORPUS = [
    "### User Instruction:",
    "### User Profile:",
    "### User History:",
    "### Response:",
    "Which tag does this movie relate to among the following tags?",
    "Just answer with the tag name without further explanation.",
    "tags: [sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, classic, "
    "psychology, fantasy, romance, thought-provoking, social commentary, violence, true story]",
    "Which category does this news article relate to among the following categories?",
    "categories: [travel, education, parents, style & beauty, entertainment, food & drink, "
    "science & technology, business, sports, healthy living, women, politics, crime, culture & arts, religion]",
    "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
    "or 5 without further explanation.",
    "Generate a headline for the following article.",
    "Generate a title for the following abstract of a paper.",
    "Paraphrase the following text into tweet without any explanation before or after it.",
    "Identify the most relevant reference for the listed publication by the researcher.",
    "Select the reference paper that is most closely related to the researcher's work.",
    "Please respond with only the number that corresponds to the reference.",
    "Paper Title: Reference: [1] - [2] - Answer:",
    "Description: Tag: Text: Title: Category: Score: Abstract: Tweet: Article: Review: Headline:",
    "Look at the following past articles this user has written and determine the most popular one.",
    "Write a summary, in English, of the research interests of the author. Only generate the summary.",
    "The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "A young woman travels across the country to find her lost brother.",
    "Scientists discover a new species of frog in the rain forest.",
    "The senator announced a new plan for schools and healthy food.",
    "This product works well, but the battery life is short.",
    "I loved this book and would read it again and again.",
    "Stocks rose sharply today after the bank cut interest rates.",
    "We propose a simple method for learning language models from user history.",
    "Our results show that personalized models beat the baseline on six tasks.",
    "Just finished a great run in the park, feeling happy today!",
    "The film is a dark comedy about a family business gone wrong.",
    "Parents and teachers talk about education and the future of children.",
    "A robot learns to love in a world without people.",
    "The team won the game in the last minute of the match.",
    "New recipes for summer: fresh salad, grilled fish and cold drinks.",
    "He says the election will change politics for a long time.",
    "The museum opens a new show of modern art and music this week.",
    "She wrote a true story about war, faith and hope.",
    "Researchers train neural networks with gradient descent and attention.",
    "Please rate the movie from one to five stars.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 2024 appear in text.",
    "Questions? Answers! Quotes \"like this\" and 'that', (brackets) and - dashes.",
]


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """Byte-level BPE on the fixed corpus, wrapped as an HF fast tokenizer with bos/eos/unk, no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK)


def build_tiny_llama(out_dir, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                     num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                     vocab_size: int | None = None) -> Path:
    """Write a random fp32 LlamaForCausalLM with its tokenizer to ``out_dir`` (an HF directory).

    ``vocab_size`` defaults to the tokenizer's size; another value makes a model whose embedding
    table does not match the tokenizer (for tests of that mismatch, or of other tokenizers).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # Default init leaves the norms at exactly 1; perturb them so tests see every weight matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
