// Byte-pair encoding of one word, as open_clip's SimpleTokenizer.bpe merges it, in C++.
//
// A word arrives in CLIP's byte-level form (one Unicode character per UTF-8 byte of the original word). Its
// symbols start as its characters, the last one carrying the end-of-word mark ("x</w>"); then, as in the
// reference, the adjacent pair with the lowest merge rank is merged everywhere it occurs (left to right,
// without overlap) until no adjacent pair has a rank. The result is the vocabulary ids of the final symbols.
// Per merge round: one pass to find the best pair, one to rewrite the word; words are short, so this beats
// Python's version (a set of pairs rebuilt and a min() over it every round) by two orders of magnitude.

#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

class Bpe {
 public:
  // vocab: every symbol, in id order; merges: symbol pairs in rank order (rank = position).
  Bpe(const std::vector<std::string>& vocab, const std::vector<std::pair<std::string, std::string>>& merges) {
    ids_.reserve(vocab.size());
    for (size_t i = 0; i < vocab.size(); ++i) ids_.emplace(vocab[i], static_cast<int64_t>(i));
    ranks_.reserve(merges.size());
    for (size_t r = 0; r < merges.size(); ++r) {
      const auto& [a, b] = merges[r];
      const int64_t ia = id_of(a, "merges"), ib = id_of(b, "merges"), merged = id_of(a + b, "merges");
      ranks_.emplace(key(ia, ib), Merge{static_cast<int64_t>(r), merged});
    }
  }

  std::vector<int64_t> encode(const std::string& word) const {
    std::vector<int64_t> symbols;
    size_t i = 0;
    while (i < word.size()) {  // one UTF-8 character per symbol
      const size_t len = utf8_length(static_cast<unsigned char>(word[i]));
      TORCH_CHECK(i + len <= word.size(), "Bpe.encode: word is not valid UTF-8");
      const bool last = i + len == word.size();
      symbols.push_back(id_of(word.substr(i, len) + (last ? "</w>" : ""), "the word"));
      i += len;
    }
    std::vector<int64_t> next;
    while (symbols.size() > 1) {
      int64_t best = std::numeric_limits<int64_t>::max(), first = -1, second = -1, merged = -1;
      for (size_t j = 0; j + 1 < symbols.size(); ++j) {
        const auto it = ranks_.find(key(symbols[j], symbols[j + 1]));
        if (it != ranks_.end() && it->second.rank < best) {
          best = it->second.rank;
          first = symbols[j];
          second = symbols[j + 1];
          merged = it->second.merged;
        }
      }
      if (merged < 0) break;
      next.clear();
      for (size_t j = 0; j < symbols.size();) {
        if (j + 1 < symbols.size() && symbols[j] == first && symbols[j + 1] == second) {
          next.push_back(merged);
          j += 2;
        } else {
          next.push_back(symbols[j]);
          j += 1;
        }
      }
      symbols.swap(next);
    }
    return symbols;
  }

 private:
  struct Merge {
    int64_t rank, merged;
  };

  static uint64_t key(int64_t a, int64_t b) { return (static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b); }

  static size_t utf8_length(unsigned char lead) {
    if (lead < 0x80) return 1;
    if ((lead >> 5) == 0x6) return 2;
    if ((lead >> 4) == 0xE) return 3;
    return 4;
  }

  int64_t id_of(const std::string& symbol, const char* where) const {
    const auto it = ids_.find(symbol);
    TORCH_CHECK(it != ids_.end(), "Bpe: symbol '", symbol, "' from ", where, " is not in the vocabulary");
    return it->second;
  }

  std::unordered_map<std::string, int64_t> ids_;
  std::unordered_map<uint64_t, Merge> ranks_;
};

}  // namespace

void register_bpe(pybind11::module& m) {
  pybind11::class_<Bpe>(m, "Bpe", "CLIP byte-pair encoding of single words (open_clip's SimpleTokenizer.bpe)")
      .def(pybind11::init<const std::vector<std::string>&, const std::vector<std::pair<std::string, std::string>>&>(),
           pybind11::arg("vocab"), pybind11::arg("merges"))
      .def("encode", &Bpe::encode, "vocabulary ids of one byte-level word", pybind11::arg("word"));
}
