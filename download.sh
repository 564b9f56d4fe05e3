#!/usr/bin/env bash
# download.sh: fetch official Llama checkpoints from Meta with the signed URL Meta emails you.
#
# Meta's flow (its own download.sh scripts in meta-llama/llama and meta-llama/llama3, and the
# `llama model download` tool in llama-models): after you accept the licence at
# https://www.llama.com/llama-downloads/ you get a URL of the form
#     https://download.llamameta.net/*?Policy=...&Signature=...&Key-Pair-Id=...
# that is valid for a day and a few downloads. The `*` stands for the path of a file on Meta's
# server; every file of a model is fetched by putting its path there. A URL serves one model
# family (Llama 2, Llama 3, Llama 3.1, Llama 3.2), so run this once per family.
#
# What this script adds to Meta's:
#   * scripted use through environment variables, --dry-run and --help;
#   * every file goes to NAME.part and is renamed to NAME only once it is complete and its
#     checksum matched, so a final name never holds a partial or corrupt file;
#   * resumable (an interrupted NAME.part continues where it stopped), with retries;
#   * checksums verified on Linux and macOS alike, file by file, against the model's
#     checklist.chk (Meta's own script ran `md5 checklist.chk` on Apple silicon, which hashes the
#     list itself and verifies nothing). A mismatch, or a file the list does not name, stops the
#     script and names the file: a file that cannot be verified never gets its final name;
#   * our model names (as params/ names them) or Meta's own (7B-chat, Meta-Llama-3-8B, Llama3.2-1B);
#   * one directory per model named as our params/ presets, each a complete checkpoint dir:
#     params.json, consolidated.NN.pth, tokenizer.model (Llama 2's shared tokenizer is linked in).
#
# Needs bash (3.2 or later: macOS's own is fine), wget or curl, and md5sum or md5.

set -euo pipefail

SCRIPT_NAME=$(basename "$0")
DOWNLOAD_TRIES=5           # attempts per file before giving up (the .part file is kept for a rerun)
RETRY_WAIT_SECONDS=10      # longest pause between two attempts
PART_SUFFIX=".part"        # a file being downloaded; renamed once complete and verified
HTTP_RANGE_NOT_SATISFIABLE=416  # the answer to "resume from byte N" when the file has N bytes
CHECKLIST="checklist.chk"  # "<md5>  <file name>" per line, one per model directory on Meta's server

# Every model this script knows. The remote folder is the model's directory on Meta's server
# (from Meta's download scripts and llama-models' sku_list.py); shards is the number of
# consolidated.NN.pth files Meta cut it into.
#
# name                          family    remote folder                      shards
MODELS="
llama-2-7b                      llama2    llama-2-7b                         1
llama-2-7b-chat                 llama2    llama-2-7b-chat                    1
llama-2-13b                     llama2    llama-2-13b                        2
llama-2-13b-chat                llama2    llama-2-13b-chat                   2
llama-2-70b                     llama2    llama-2-70b                        8
llama-2-70b-chat                llama2    llama-2-70b-chat                   8
llama-3-8b                      llama3    8b_pre_trained                     1
llama-3-8b-instruct             llama3    8b_instruction_tuned               1
llama-3-70b                     llama3    70b_pre_trained                    8
llama-3-70b-instruct            llama3    70b_instruction_tuned              8
llama-3.1-8b                    llama3.1  Llama-3.1-8B                       1
llama-3.1-8b-instruct           llama3.1  Llama-3.1-8B-Instruct              1
llama-3.1-70b                   llama3.1  Llama-3.1-70B                      8
llama-3.1-70b-instruct          llama3.1  Llama-3.1-70B-Instruct             8
llama-3.1-405b                  llama3.1  Llama-3.1-405B-MP8                 8
llama-3.1-405b-instruct         llama3.1  Llama-3.1-405B-Instruct-MP8        8
llama-3.1-405b-mp16             llama3.1  Llama-3.1-405B-MP16                16
llama-3.1-405b-instruct-mp16    llama3.1  Llama-3.1-405B-Instruct-MP16       16
llama-3.2-1b                    llama3.2  Llama-3.2-1B                       1
llama-3.2-1b-instruct           llama3.2  Llama-3.2-1B-Instruct              1
llama-3.2-3b                    llama3.2  Llama-3.2-3B                       1
llama-3.2-3b-instruct           llama3.2  Llama-3.2-3B-Instruct              1
"

# Meta's own spellings of the same models, accepted as well (in any case): Llama 2's download.sh
# asks for 7B, 13B, 70B, 7B-chat, ...; Llama 3's for 8B, 8B-instruct, 70B-instruct and puts them in
# folders named Meta-Llama-3-8B, ...; Meta's emails and Hugging Face say Meta-Llama-3.1-8B, ...;
# llama-models (`llama model download --model-id`) says Llama3.1-8B, Llama3.1-405B:bf16-mp8,
# Llama3.2-1B-Instruct, .... The remote folder names are accepted too. "70B" is Llama 2 70B, as in
# Meta's Llama 2 script (Llama 3's script also says 70B): for Llama 3 70B write Meta-Llama-3-70B.
#
# Meta's name                           our name
META_NAMES="
7B                                      llama-2-7b
7B-chat                                 llama-2-7b-chat
13B                                     llama-2-13b
13B-chat                                llama-2-13b-chat
70B                                     llama-2-70b
70B-chat                                llama-2-70b-chat
8B                                      llama-3-8b
Meta-Llama-3-8B                         llama-3-8b
8b_pre_trained                          llama-3-8b
8B-instruct                             llama-3-8b-instruct
Meta-Llama-3-8B-Instruct                llama-3-8b-instruct
8b_instruction_tuned                    llama-3-8b-instruct
Meta-Llama-3-70B                        llama-3-70b
70b_pre_trained                         llama-3-70b
70B-instruct                            llama-3-70b-instruct
Meta-Llama-3-70B-Instruct               llama-3-70b-instruct
70b_instruction_tuned                   llama-3-70b-instruct
Meta-Llama-3.1-8B                       llama-3.1-8b
Llama3.1-8B                             llama-3.1-8b
Meta-Llama-3.1-8B-Instruct              llama-3.1-8b-instruct
Llama3.1-8B-Instruct                    llama-3.1-8b-instruct
Meta-Llama-3.1-70B                      llama-3.1-70b
Llama3.1-70B                            llama-3.1-70b
Meta-Llama-3.1-70B-Instruct             llama-3.1-70b-instruct
Llama3.1-70B-Instruct                   llama-3.1-70b-instruct
Meta-Llama-3.1-405B                     llama-3.1-405b
Llama3.1-405B:bf16-mp8                  llama-3.1-405b
Llama-3.1-405B-MP8                      llama-3.1-405b
Meta-Llama-3.1-405B-Instruct            llama-3.1-405b-instruct
Llama3.1-405B-Instruct:bf16-mp8         llama-3.1-405b-instruct
Llama-3.1-405B-Instruct-MP8             llama-3.1-405b-instruct
Meta-Llama-3.1-405B-MP16                llama-3.1-405b-mp16
Llama3.1-405B:bf16-mp16                 llama-3.1-405b-mp16
Llama-3.1-405B-MP16                     llama-3.1-405b-mp16
Meta-Llama-3.1-405B-Instruct-MP16       llama-3.1-405b-instruct-mp16
Llama3.1-405B-Instruct:bf16-mp16        llama-3.1-405b-instruct-mp16
Llama-3.1-405B-Instruct-MP16            llama-3.1-405b-instruct-mp16
Llama3.2-1B                             llama-3.2-1b
Llama3.2-1B-Instruct                    llama-3.2-1b-instruct
Llama3.2-3B                             llama-3.2-3b
Llama3.2-3B-Instruct                    llama-3.2-3b-instruct
"

# ------------------------------------------------------------------------------------------
# Messages and help
# ------------------------------------------------------------------------------------------

die() {
    echo "$SCRIPT_NAME: error: $*" >&2
    exit 1
}

say() {
    echo "$SCRIPT_NAME: $*" >&2
}

model_names() {
    echo "$MODELS" | awk 'NF { print $1 }'
}

our_name_for() {  # our_name_for NAME: our name for NAME (ours or Meta's spelling, any case), or nothing
    local wanted
    wanted=$(echo "$1" | tr '[:upper:]' '[:lower:]')
    { echo "$MODELS" | awk 'NF { print $1, $1 }'; echo "$META_NAMES"; } |
        awk -v wanted="$wanted" 'NF == 2 && tolower($1) == wanted { print $2; exit }'
}

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [--dry-run] [--help]

Download official Llama checkpoints with the signed URL from Meta's email.

Asks for the URL and the list of models, unless these environment variables are set:
  PRESIGNED_URL   the URL from Meta's email (quote it: it holds '*', '?' and '&')
  MODEL_SIZE      models to fetch, comma-separated, e.g. llama-3.1-8b,llama-3.1-8b-instruct
  TARGET_FOLDER   where to put them (default: the current directory); each model gets
                  TARGET_FOLDER/<name>/ with params.json, consolidated.NN.pth, tokenizer.model
  DOWNLOADER      wget or curl (default: wget if installed, else curl)

Options:
  --dry-run   print what would be fetched, and where; fetch and create nothing
  -h, --help  show this help

Rerunning resumes: finished files are kept, NAME.part files continue where they stopped.
Each file is checked against the model's checklist.chk; a mismatch, or a file the list does not
name, stops with the file's name.
One URL serves one family (Llama 2, 3, 3.1 or 3.2): run once per family.

Models:
$(model_names | paste -sd' ' - | fold -s -w 88 | sed -e 's/^/  /' -e 's/ *$//')
Meta's own names work too, as its emails and download scripts write them: 7B, 13B-chat,
70B (Llama 2), 8B-instruct, Meta-Llama-3-70B, Meta-Llama-3.1-8B-Instruct, Llama3.1-8B,
Llama3.1-405B:bf16-mp16, Llama3.2-1B-Instruct, ... (the table META_NAMES in this script).
EOF
}

# ------------------------------------------------------------------------------------------
# Checksums: md5sum (Linux) or md5 (macOS); sha256 too, in case a checklist holds those
# ------------------------------------------------------------------------------------------

MD5_HEX_LENGTH=32
SHA256_HEX_LENGTH=64

digest_of() {  # digest_of FILE LENGTH: the hex digest of FILE with the algorithm of that length
    local file=$1 length=$2
    case $length in
        "$MD5_HEX_LENGTH")
            if command -v md5sum >/dev/null; then md5sum "$file" | awk '{ print $1 }'
            elif command -v md5 >/dev/null; then md5 -q "$file"
            else die "neither md5sum nor md5 is installed: cannot verify $file"; fi ;;
        "$SHA256_HEX_LENGTH")
            if command -v sha256sum >/dev/null; then sha256sum "$file" | awk '{ print $1 }'
            elif command -v shasum >/dev/null; then shasum -a 256 "$file" | awk '{ print $1 }'
            else die "neither sha256sum nor shasum is installed: cannot verify $file"; fi ;;
        *) die "unexpected checksum length $length for $file" ;;
    esac
}

expected_digest() {  # expected_digest CHECKLIST NAME: NAME's digest in the list, or nothing
    # Lines are "<digest>  <name>" (md5sum's format), maybe "<digest> *<name>" or "./<name>".
    awk -v name="$2" '{ file = $2; sub(/^\*/, "", file); sub(/^\.\//, "", file)
                        if (file == name) { print tolower($1); exit } }' "$1"
}

verify() {  # verify FILE CHECKLIST NAME: stop the script if FILE's digest is not NAME's in the list
    local file=$1 checklist=$2 name=$3 expected actual
    expected=$(expected_digest "$checklist" "$name")
    if [ -z "$expected" ]; then
        die "$(dirname "$checklist")/$name is not listed in $checklist, so it cannot be verified and is" \
            "not done: it is kept as $file, not under its own name. Fetch the model's checklist again" \
            "(delete $checklist and rerun) or check the file by other means."
    fi
    actual=$(digest_of "$file" "${#expected}")
    if [ "$actual" != "$expected" ]; then
        rm -f "$file"
        die "checksum mismatch for $(dirname "$checklist")/$name: expected $expected, got $actual" \
            "(listed in $checklist). The corrupt download was deleted; run again to fetch it anew."
    fi
}

# ------------------------------------------------------------------------------------------
# Fetching one file: NAME.part, resumed and retried, renamed to NAME when complete and verified
# ------------------------------------------------------------------------------------------

choose_downloader() {
    case ${DOWNLOADER:-} in
        "") if command -v wget >/dev/null; then echo wget
            elif command -v curl >/dev/null; then echo curl
            else die "neither wget nor curl is installed: install one of them"; fi ;;
        wget | curl) command -v "$DOWNLOADER" >/dev/null || die "DOWNLOADER=$DOWNLOADER, but it is not installed"
                     echo "$DOWNLOADER" ;;
        *) die "DOWNLOADER must be wget or curl, got '$DOWNLOADER'" ;;
    esac
}

url_for() {  # url_for PATH: the signed URL with PATH in place of its '*'
    echo "${PRESIGNED_URL/\*/$1}"
}

without_query() {  # a URL without its signature, for printing
    echo "${1%%\?*}"
}

download() {  # download URL OUT: resume OUT if it exists, retry; nonzero status on failure
    local url=$1 out=$2 progress
    if [ "$DOWNLOADER_TOOL" = wget ]; then
        # A progress bar on a terminal; in a log, one dot per MB instead of a bar redrawn per second.
        if [ -t 2 ]; then progress=bar:force:noscroll; else progress=dot:giga; fi
        wget --no-config --continue --tries="$DOWNLOAD_TRIES" --waitretry="$RETRY_WAIT_SECONDS" \
             --no-verbose --show-progress --progress="$progress" -O "$out" "$url"
    else
        if [ -t 2 ]; then progress=--progress-bar; else progress=--silent; fi
        local http_code
        http_code=$(curl --fail --location --continue-at - --retry "$DOWNLOAD_TRIES" \
                         --retry-delay "$RETRY_WAIT_SECONDS" "$progress" --show-error \
                         --write-out '%{http_code}' --output "$out" "$url") && return 0
        # A .part that is already complete (a run stopped before renaming it) gets "416: nothing
        # left to send". wget takes that as done; curl fails, so accept it here: the checksum decides.
        [ "$http_code" = "$HTTP_RANGE_NOT_SATISFIABLE" ] && [ -s "$out" ]
    fi
}

fetch() {  # fetch REMOTE_PATH LOCAL_FILE [CHECKLIST]: download, verify against CHECKLIST if given
    local remote=$1 local_file=$2 checklist=${3:-}
    local url
    url=$(url_for "$remote")
    if [ "$DRY_RUN" = 1 ]; then
        echo "would fetch $(without_query "$url") -> $local_file"
        return 0
    fi
    if [ -f "$local_file" ]; then
        say "have $local_file"
        return 0
    fi
    say "fetching $remote -> $local_file"
    download "$url" "$local_file$PART_SUFFIX" ||
        die "could not download $remote to $local_file (from $(without_query "$url")); the partial" \
            "file $local_file$PART_SUFFIX is kept and a rerun resumes it. If the URL expired (403)," \
            "request a new one from Meta."
    if [ -n "$checklist" ]; then
        verify "$local_file$PART_SUFFIX" "$checklist" "$(basename "$local_file")"
    fi
    mv -f "$local_file$PART_SUFFIX" "$local_file"
}

fetch_checklist() {  # fetch_checklist REMOTE_PATH LOCAL_FILE: a checksum list, which must exist
    local remote=$1 local_file=$2
    local url
    url=$(url_for "$remote")
    if [ "$DRY_RUN" = 1 ]; then
        echo "would fetch $(without_query "$url") -> $local_file"
        return 0
    fi
    if [ ! -f "$local_file" ]; then
        download "$url" "$local_file$PART_SUFFIX" ||
            die "could not download $remote (from $(without_query "$url")): without it nothing can be" \
                "verified, so nothing more is fetched"
        mv -f "$local_file$PART_SUFFIX" "$local_file"
    fi
    [ -s "$local_file" ] || die "$local_file is empty: nothing could be verified against it"
}

# ------------------------------------------------------------------------------------------
# One family's shared files, one model's files
# ------------------------------------------------------------------------------------------

fetch_family_files() {  # fetch_family_files FAMILY: the files at the root of that family's URL
    case $1 in
        llama2)
            fetch LICENSE "$TARGET_FOLDER/LICENSE"
            fetch USE_POLICY.md "$TARGET_FOLDER/USE_POLICY.md"
            fetch_checklist tokenizer_checklist.chk "$TARGET_FOLDER/tokenizer_checklist.chk"
            fetch tokenizer.model "$TARGET_FOLDER/tokenizer.model" "$TARGET_FOLDER/tokenizer_checklist.chk" ;;
        llama3)
            fetch LICENSE "$TARGET_FOLDER/LICENSE"
            fetch USE_POLICY "$TARGET_FOLDER/USE_POLICY" ;;
        *) ;;  # Llama 3.1 and 3.2: everything is in the model's folder
    esac
}

fetch_model() {  # fetch_model NAME FAMILY REMOTE_FOLDER SHARDS
    local name=$1 family=$2 remote=$3 shards=$4
    local dir="$TARGET_FOLDER/$name" checklist="$TARGET_FOLDER/$name/$CHECKLIST" shard file
    say "model $name ($shards shard(s), from $remote/)"
    if [ "$DRY_RUN" = 0 ]; then mkdir -p "$dir"; fi
    fetch_checklist "$remote/$CHECKLIST" "$checklist"
    fetch "$remote/params.json" "$dir/params.json" "$checklist"
    if [ "$family" = llama2 ]; then
        # Llama 2 has one tokenizer for all sizes, at the root: link it in (a hard link takes no space).
        if [ "$DRY_RUN" = 0 ] && [ ! -f "$dir/tokenizer.model" ]; then
            ln "$TARGET_FOLDER/tokenizer.model" "$dir/tokenizer.model" 2>/dev/null ||
                cp "$TARGET_FOLDER/tokenizer.model" "$dir/tokenizer.model"
        fi
    else
        fetch "$remote/tokenizer.model" "$dir/tokenizer.model" "$checklist"
    fi
    for ((shard = 0; shard < shards; shard++)); do
        file=$(printf "consolidated.%02d.pth" "$shard")
        fetch "$remote/$file" "$dir/$file" "$checklist"
    done
    if [ "$DRY_RUN" = 0 ]; then say "$dir is complete and verified"; fi
}

# ------------------------------------------------------------------------------------------
# Main: options, inputs (checked before anything is fetched), then the downloads
# ------------------------------------------------------------------------------------------

DRY_RUN=0
for arg in "$@"; do
    case $arg in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        *) die "unknown argument '$arg' (see $SCRIPT_NAME --help)" ;;
    esac
done

PRESIGNED_URL=${PRESIGNED_URL:-}
MODEL_SIZE=${MODEL_SIZE:-}
TARGET_FOLDER=${TARGET_FOLDER:-.}

if [ -z "$PRESIGNED_URL" ]; then
    read -r -p "Enter the URL from Meta's email: " PRESIGNED_URL || true
fi
[ -n "$PRESIGNED_URL" ] || die "no URL given: paste it when asked, or set PRESIGNED_URL"
case $PRESIGNED_URL in
    *'*'*) ;;
    *) die "the URL has no '*': paste the whole URL from Meta's email (its '*' stands for each file's path)" ;;
esac

if [ -z "$MODEL_SIZE" ]; then
    echo "Models: $(model_names | paste -sd' ' -)" >&2
    read -r -p "Enter the models to download, comma-separated: " MODEL_SIZE || true
fi
[ -n "$MODEL_SIZE" ] || die "no models given: name them when asked, or set MODEL_SIZE (see --help)"

# Resolve every name before fetching anything, so a typo costs nothing.
SELECTED=""
for requested in $(echo "$MODEL_SIZE" | tr ',' ' '); do
    name=$(our_name_for "$requested")
    [ -n "$name" ] || die "unknown model '$requested' in MODEL_SIZE; known models: $(model_names | paste -sd' ' -)" \
                          "(or Meta's own names: see --help)"
    if [ "$name" != "$(echo "$requested" | tr '[:upper:]' '[:lower:]')" ]; then say "$requested is $name"; fi
    row=$(echo "$MODELS" | awk -v name="$name" '$1 == name')
    SELECTED="$SELECTED$row"$'\n'
done
FAMILIES=$(echo "$SELECTED" | awk 'NF && !seen[$2]++ { print $2 }')
if [ "$(echo "$FAMILIES" | wc -l)" -gt 1 ]; then
    say "warning: these models come from several families ($(echo "$FAMILIES" | paste -sd' ' -)), and a URL serves one"
fi

DOWNLOADER_TOOL=$(choose_downloader)
if [ "$DRY_RUN" = 0 ]; then mkdir -p "$TARGET_FOLDER"; fi
for family in $FAMILIES; do
    fetch_family_files "$family"
done
while read -r name family remote shards; do
    if [ -n "$name" ]; then fetch_model "$name" "$family" "$remote" "$shards"; fi
done <<<"$SELECTED"
if [ "$DRY_RUN" = 1 ]; then say "dry run: nothing was fetched"
else say "done: every model file matched its checksum (Meta lists none for LICENSE and USE_POLICY)"; fi
