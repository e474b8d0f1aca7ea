#!/usr/bin/env bash
# Regenerates python/vita_engine/data/{hello,question}.wav (development only; needs Debian
# espeak-ng and sox: apt-get install -y espeak-ng sox). Tests use the committed files.
set -euo pipefail
cd "$(dirname "$0")/.."
out=python/vita_engine/data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gen() {  # name, words per minute, text
  espeak-ng -v en-us -s "$2" -w "$tmp/$1_raw.wav" "$3"
  # trim leading/trailing silence, 16 kHz mono PCM16
  sox -D "$tmp/$1_raw.wav" -r 16000 -c 1 -b 16 "$out/$1.wav" \
    silence 1 0.01 0.1% reverse silence 1 0.01 0.1% reverse rate -v 16000
  echo "$out/$1.wav: $(soxi -D "$out/$1.wav") s"
}
gen hello 170 "Hello, what can you see in this picture?"
gen question 165 "Can you tell me what the weather is like in Paris today?"
