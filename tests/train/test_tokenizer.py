import numpy as np
import pytest

from tilecomp.errors import TilecompError
from tilecomp.train import tokenizer as tk

TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Stack:\n    \"\"\"A LIFO stack.\"\"\"\n    def push(self, item):\n        self.items.append(item)\n",
    "# comments too\nimport os\nprint(os.path.join('a', 'b'))\n",
] * 5


@pytest.fixture(scope="module")
def tok():
    return tk.train_tokenizer(TEXTS, vocab_size=320)


def test_special_ids_are_fixed(tok):
    assert tok.token_to_id(tk.EOS_TOKEN) == tk.EOS_ID == 0
    assert tok.token_to_id(tk.MASK_TOKEN) == tk.MASK_ID == 1
    assert 260 < tok.get_vocab_size() <= 320


@pytest.mark.parametrize("text", ["def fibonacci(n):\n\treturn n  # ok\n", "naïve café ∑ 😀 \x00\r\n",
                                  "    deeply   indented\n\n\n", ""])
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text).ids) == text


def test_training_is_deterministic(tok):
    again = tk.train_tokenizer(TEXTS, vocab_size=320)
    assert again.to_str() == tok.to_str()


def test_encode_documents_separates_with_eos(tok):
    ids = tk.encode_documents(tok, ["x = 1\n", "y = 2\n"])
    assert ids.dtype == np.uint16 and (ids == tk.EOS_ID).sum() == 2 and ids[-1] == tk.EOS_ID
    first = int(np.flatnonzero(ids == tk.EOS_ID)[0])
    assert tok.decode(ids[:first].tolist()) == "x = 1\n"


def test_load_checks_files(tmp_path, tok):
    with pytest.raises(TilecompError, match="tokenizer.json not found"):
        tk.load_tokenizer(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert tk.load_tokenizer(tmp_path).to_str() == tok.to_str()
