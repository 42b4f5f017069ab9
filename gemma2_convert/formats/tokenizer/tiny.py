"""A tiny SentencePiece BPE model laid out like Gemma's ``tokenizer.model``, for tests and ``demo``.

Trained offline and deterministically (one thread, input in file order, no sampling) from a
small corpus embedded below, so the same sentencepiece version always writes the same bytes.

Layout, mirroring Gemma's model (see ``tokenizer.py`` for the sources):

* 0 ``<pad>``, 1 ``<eos>``, 2 ``<bos>`` CONTROL; 3 ``<unk>`` UNKNOWN;
* then USER_DEFINED pieces: ``<mask>``, ``<start_of_turn>``, ``<end_of_turn>``, newline runs,
  tab runs and space runs ``▁▁`` … ``▁`` × 16 (Gemma stores its turn markers and whitespace runs
  as user-defined pieces, which SentencePiece matches atomically, longest first);
* the 256 byte pieces ``<0x00>`` … ``<0xFF>`` (byte fallback), then the learned BPE pieces.

Normalizer: identity, no dummy prefix, whitespace kept; digits split; whitespace-only pieces allowed.
Needs only the ``sentencepiece`` package.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

from gemma2_convert.core.errors import ConfigError

#: Pieces after ``<pad> <eos> <bos> <unk>``, in id order (ids 4, 5, 6, …).
USER_DEFINED_PIECES: tuple[str, ...] = (
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "\n",
    "\n\n",
    "\n\n\n",
    "\t\t",
    "\t\t\t",
    *("▁" * n for n in range(2, 17)),
)
_N_META = 4 + len(USER_DEFINED_PIECES) + 256  # specials, user-defined, bytes

MIN_VOCAB_SIZE = _N_META + 160
MAX_VOCAB_SIZE = 1024
_ASCII_WEIGHT = 5

# Original text written for this module: prose, code (space and tab indentation), numbers,
# and several scripts, so the learned pieces exercise every tokenizer path.
CORPUS = """\
The river was low that autumn, and the stones along its bed showed their green backs to the sky.
Every morning the ferryman counted the boats, wrote the number in a small notebook, and drank his tea.
She asked whether the library would open before noon; nobody knew, so they waited on the steps.
A good converter keeps every number exact: it reads the weights, checks the shapes, and writes them back.
When the wind turned cold, the children ran home, laughing, their scarves trailing behind them.
Mathematics is the art of giving the same name to different things, or so the old teacher said.
The train to the coast leaves at 07:45 and arrives at 11:20, unless the bridge is closed again.
He planted 12 rows of beans, 7 rows of onions, and 3 rows of something nobody could identify.
Prices rose by 3.5% in March, fell by 1.25% in April, and stayed flat through the summer of 2024.
Call 555-0199 before 18:00, or write to the office at 42 Harbour Road, Flat 3B.
The recipe needs 250 g of flour, 2 eggs, 100 ml of milk, and a pinch of salt.
In 1969, 600 million people watched the landing; in 2019, the recording was restored frame by frame.
Question: what is 17 * 23? Answer: 391. Question: what is 1024 / 8? Answer: 128.

def rms_norm(x, weight, eps=1e-6):
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return x * (1.0 + weight)

class Counter:
    def __init__(self, start=0):
        self.value = start

    def step(self, amount=1):
        if amount < 0:
            raise ValueError("amount must be positive")
        self.value += amount
        return self.value

for i in range(10):
    if i % 2 == 0:
        print(f"even: {i}")
    else:
        print(f"odd: {i}")

int main(void) {
\tint total = 0;
\tfor (int i = 0; i < 100; i++) {
\t\ttotal += i;
\t}
\tprintf("%d\\n", total);
\treturn 0;
}

{"name": "tiny", "layers": 2, "hidden": 64, "heads": [4, 2], "tied": true, "scale": 0.125}
SELECT id, name FROM users WHERE age > 30 ORDER BY name LIMIT 20;
<start_of_turn>user
What is the capital of France?<end_of_turn>
<start_of_turn>model
The capital of France is Paris.<end_of_turn>

Москва — столица России. Зимой здесь холодно, а летом бывает жарко и солнечно.
Мы читали книгу весь вечер, а потом пили чай с вареньем и говорили о погоде.
Программа считает числа от одного до ста и печатает их сумму на экране.
Привет, мир! Как дела? Всё хорошо, спасибо.

東京は日本の首都です。春には桜が咲き、多くの人が公園に集まります。
私は毎朝コーヒーを飲みながら新聞を読みます。今日は雨が降っています。
北京是中国的首都。我们今天去公园散步，天气很好。
这个程序读取模型的权重，然后把它们写成新的格式。
서울은 한국의 수도입니다. 오늘 날씨가 정말 좋네요.

مرحبا بالعالم. القاهرة مدينة كبيرة وجميلة على ضفاف النيل.
نحن نحب القراءة في المساء، ونشرب الشاي مع الأصدقاء.
Η Αθήνα είναι η πρωτεύουσα της Ελλάδας. Καλημέρα σε όλους!
नमस्ते दुनिया। आज मौसम बहुत अच्छा है।

The old lighthouse keeper wrote letters to nobody, sealed them carefully, and kept them in a drawer.
After the storm, the fishermen mended their nets and talked about the price of fuel and the new harbour.
Snow fell quietly on the roofs of the village, and the church bell rang twelve times at midnight.
A careful engineer tests the small things first: the shapes, the names, the order of the bytes.
Read the file, parse the header, stream the tensors, verify the result, and only then rename it.
"""


def make_tiny_spm(path: str | Path, vocab_size: int = 512) -> Path:
    """Train the tiny Gemma-layout SentencePiece model and write it to ``path``.

    Returns ``path`` as a Path. ``vocab_size`` must lie in [MIN_VOCAB_SIZE, MAX_VOCAB_SIZE];
    the model then has exactly ``vocab_size`` pieces.
    """
    import sentencepiece as spm

    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ConfigError(
            f"tiny tokenizer vocab_size {vocab_size} is outside [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}]: "
            f"it needs {_N_META} fixed pieces plus learned ones, and the embedded corpus supports at most "
            f"{MAX_VOCAB_SIZE}. Pick a vocab_size in that range."
        )
    model = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(),
            model_writer=model,
            logstream=quiet,
            **trainer_options(vocab_size),
        )
    out = Path(path)
    out.write_bytes(model.getvalue())
    return out


def _training_lines() -> Iterator[str]:
    """Corpus lines in order, ASCII lines ``_ASCII_WEIGHT`` times.

    The weighting pushes the rarest non-Latin characters below the 98 % character coverage, so
    they are left to byte fallback, as rare characters are in Gemma's vocabulary.
    """
    for line in CORPUS.splitlines():
        yield from [line] * (_ASCII_WEIGHT if line.isascii() else 1)


def trainer_options(vocab_size: int) -> dict[str, object]:
    """SentencePiece trainer flags giving Gemma's tokenizer layout and normalization."""
    return {
        "model_type": "bpe",
        "vocab_size": vocab_size,
        "hard_vocab_limit": True,
        "pad_id": 0, "pad_piece": "<pad>",
        "eos_id": 1, "eos_piece": "<eos>",
        "bos_id": 2, "bos_piece": "<bos>",
        "unk_id": 3, "unk_piece": "<unk>",
        "user_defined_symbols": list(USER_DEFINED_PIECES),
        "byte_fallback": True,
        "split_digits": True,
        "allow_whitespace_only_pieces": True,
        "normalization_rule_name": "identity",
        "add_dummy_prefix": False,
        "remove_extra_whitespaces": False,
        "character_coverage": 0.98,
        "max_sentencepiece_length": 16,
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,
        "num_threads": 1,
        "minloglevel": 2,
    }
