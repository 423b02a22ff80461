"""Words that random prompts are made of.

Very common lowercase English words: each is one token in byte-level BPE vocabularies such as the
project's 8k tokenizer and DeepSeek-V2's 100k one, so a prompt of N words is close to N tokens (+1
for BOS). The tool still reports the token counts the server returns, never this estimate.
"""
WORDS = tuple("""
the of and to in a is that for it as was with be by on not he i this are or his from at which but
have an they you were her she there had one all we their will would who so if more when no out up
do any your what man other than our some very time my them upon him may now me then great well see
should like over say most can good men day long old new way house hand place night head know how
where here us own too much room side right light land king father boy let go come make take look
think tell ask hear run live hold stand set change read
""".split())
