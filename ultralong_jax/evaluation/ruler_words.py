"""Word sources of the RULER tasks: needle keys and values, common words, coded words.

RULER (Hsieh et al. 2024; github.com/NVIDIA/RULER, scripts/data/synthetic/niah.py and
common_words_extraction.py) draws words from the `wonderwords` package's noun / adjective / verb
lists: needle keys are "adjective-noun" pairs, the common-words list samples single words. These
are our own built-in lists of everyday English words (no download): keys are adjective-noun pairs
as in RULER (273 x 323 of them); the common-words task takes single words first and, for lists
longer than the single words (RULER then switches to a large English word list), adjective-noun
and then adjective-adjective-noun compounds, so any length has enough distinct words.
"""

from __future__ import annotations

import random
import string
import uuid

ADJECTIVES = tuple("""
    able active actual afraid ancient angry annual anxious aware basic bitter blank bold brave
    brief bright broad broken busy calm careful casual central cheap civil clean clear clever
    close cold common complex cool correct crazy crisp cruel curious cute daily damp dark dear
    decent deep dense direct dirty distant double dry due dull eager early eastern easy elder
    empty equal even exact exotic extra fair faithful false famous fancy fast fat fierce final
    fine firm flat fluffy fond formal fragile free fresh friendly front frozen full funny gentle
    giant glad global golden good grand grateful great green grim gross guilty happy hard harsh
    heavy helpful hidden high hollow honest hot huge humble hungry icy ideal idle inner jolly
    junior keen kind large late lazy legal level light little live local lonely long loose loud
    lovely low loyal lucky mad main major mellow mental mild minor misty modern modest moral
    muddy narrow nasty native neat nervous new nice noble noisy normal novel odd old open orange
    pale past patient plain pleasant polite poor precious pretty proud public pure purple quick
    quiet rapid rare raw ready real regular rich rigid ripe robust rough round royal rude rural
    rusty sacred sad safe salty scared secret senior serious sharp shiny short shy silent silly
    simple sleepy slim slow small smart smooth soft solid sour spare special spicy square stale
    steady steep sticky stiff still strange strict strong sudden sunny super sweet swift tall
    tame tender thick thin tidy tiny tough tricky true typical ugly unique upper urban useful
    usual vague valid vast violet vivid warm weak wealthy weird wet whole wide wild wise witty
    wooden young zany
""".split())  # no digits anywhere: numbers are needle values

NOUNS = tuple("""
    account actor adult advice agency airport alarm album anchor angle animal answer apple area
    army arrow artist aspect attic author autumn baby badge bakery ball banana band bank barrel
    basket battle beach bean bear bed bell belt bench berry bicycle bird blanket boat body bone
    book border bottle box brain branch bread breeze brick bridge brother bucket budget bull
    button cabin cable cake camera camp candle canoe canvas captain car carpet castle cat cattle
    cave cellar chair chalk channel chapter cheese cherry chicken church circle city clock cloud
    coach coast coat coffee coin comet copper cottage cotton country cousin cow crayon crowd
    crown cup curtain cushion dancer daughter deer desert desk diamond dinner doctor dog doll
    dolphin donkey door dragon drawer dream dress drum duck eagle earth editor egg elbow engine
    estate falcon farm farmer feather fence ferry field finger fire fish flag flower forest fork
    fountain fox frog fruit garage garden gate ghost giraffe glass glove goat gold grape grass
    guitar hammer harbor hat hawk heart helmet hill horse hotel house island jacket jelly jewel
    judge kettle key kingdom kitchen kite knee knife ladder lake lamp lantern lawyer leaf lemon
    letter library lion lizard lock machine magnet mango map market meadow melon mirror monkey
    moon mountain mouse museum needle nest night ocean office onion orchard otter owl oyster
    paint palace panda paper parrot pearl pencil pepper piano pigeon pillow pilot planet plant
    pocket poem pond potato pumpkin puzzle queen rabbit radio rain river road robot rocket roof
    rose saddle sailor salmon sand school scissors sheep shell ship shirt shoe shop singer
    sister sky snake snow soap sock soldier song spider spoon squirrel star station stone storm
    stove street student sugar summer sun swan table teacher temple tent theater ticket tiger
    timber tomato tooth tower town toy tractor train tree truck tulip tunnel turtle umbrella
    uncle valley vase village violin wagon wallet walnut water wave whale wheel window winter
    wolf wood yard zebra
""".split())  # 

VERBS = tuple("""
    accept achieve add admire agree allow answer appear arrange arrive ask attach attack avoid
    bake balance bathe beg behave belong blink boil borrow bounce breathe bring brush build bump
    burn buzz calculate call carry carve catch change charge chase cheer chew choose clap clean
    climb close collect comb compare complain count cover crack crawl cross cry cycle dance
    decide deliver depend describe design destroy develop dig discover divide drag drain draw
    dream dress drift drink drive drop dry earn eat enjoy enter escape examine exist expand
    explain explore fail fasten fetch fill find fix float flow fly fold follow forget found
    gather gaze glow grab greet grin grow guard guess guide hammer hand hang happen hate heal
    hear help hide hike hold hop hover hug hum hunt hurry identify imagine improve include
    inform inject invent invite jog join joke juggle jump keep kick kneel knit knock land laugh
    launch lead learn lend lick lift listen live load lock look love manage march mark marry
    match measure melt mend mix move nest nod notice obey offer open order own pack paddle paint
    park pass pause peel perform pick plan plant play point polish pour pray preach press print
    produce protect pull pump punch push question race rain reach read receive record reduce
    reflect refuse relax remain remember remove repair repeat reply report rescue rest return
    ride ring rinse roll row rub rule run rush sail save scatter scream search send serve settle
    shake share shine shiver shop shout sing sink sip skate ski sleep slide smell smile sneeze
    snore solve sort spell spill spin splash spray squeeze stack stare start stay steer step
    stir stitch stop store stretch stroll study suggest supply surf swim swing talk taste teach
    tease tell test thank thaw think throw tickle tie touch tour trace trade train travel trim
    trip trot trust try tug turn twist type unlock unpack untie use vanish visit wait walk
    wander want warn wash watch water wave weigh whisper whistle wink wish wobble wonder work
    worry wrap write yawn yell zoom
""".split())  # 

SINGLE_WORDS = tuple(sorted(set(ADJECTIVES + NOUNS + VERBS)))


def key_word(rng: random.Random) -> str:
  """An "adjective-noun" needle key, as RULER's `words` type."""
  return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number(rng: random.Random, digits: int = 7) -> str:
  """A random number of exactly `digits` digits (RULER's `numbers` type: 7 digits)."""
  return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def uuid4(rng: random.Random) -> str:
  """A random version-4 UUID string from `rng` (RULER's `uuids` type)."""
  return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def needle_value(kind: str, rng: random.Random) -> str:
  """A needle key or value of RULER's type `kind`: words, numbers or uuids."""
  if kind == "words":
    return key_word(rng)
  if kind == "numbers":
    return number(rng)
  if kind == "uuids":
    return uuid4(rng)
  raise ValueError(f"unknown needle type {kind!r}; use words, numbers or uuids.")


def distinct_words(rng: random.Random, n: int) -> list[str]:
  """`n` distinct words: the single words in random order, then (when more are needed)
  adjective-noun and then adjective-adjective-noun compounds. For one `rng` state the first n
  words are the same whatever `n` asks for."""
  words = list(SINGLE_WORDS)
  rng.shuffle(words)
  if n <= len(words):
    return words[:n]
  pairs = list(range(len(ADJECTIVES) * len(NOUNS)))
  rng.shuffle(pairs)
  words += [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}"
            for i in pairs[:n - len(words)]]
  seen = set(words)
  while len(words) < n:  # 3-part compounds: ~24M of them, drawn with rejection of repeats
    word = f"{rng.choice(ADJECTIVES)}-{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if word not in seen:
      seen.add(word)
      words.append(word)
  return words


def coded_words(rng: random.Random, n: int, length: int = 6) -> list[str]:
  """`n` distinct random lower-case "coded words" of `length` letters (RULER's fwe vocabulary)."""
  words, seen = [], set()
  while len(words) < n:
    word = "".join(rng.choices(string.ascii_lowercase, k=length))
    if word not in seen:
      seen.add(word)
      words.append(word)
  return words
