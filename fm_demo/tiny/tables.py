"""Fixed vocabularies the synthetic corpus draws from (written for this project, free to reuse).

Small on purpose: a model of a few million parameters trained for minutes on a CPU can learn
every entry, so the demo shows correct answers instead of plausible noise.
"""

from __future__ import annotations

CAPITALS: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Greece": "Athens", "Poland": "Warsaw", "Austria": "Vienna",
    "Hungary": "Budapest", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Ireland": "Dublin", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Russia": "Moscow", "Canada": "Ottawa",
    "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima",
    "Chile": "Santiago", "Colombia": "Bogota", "Australia": "Canberra", "Morocco": "Rabat",
    "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh",
    "Qatar": "Doha", "the United Arab Emirates": "Abu Dhabi", "the United Kingdom": "London",
    "the United States": "Washington",
}

# Common words for spelling, reversing, counting letters and the memory game.
WORDS: tuple[str, ...] = tuple("""
apple river garden window yellow purple orange banana rabbit turtle castle bridge forest
planet rocket silver golden winter summer spring autumn dragon tiger lion zebra horse camel
falcon eagle parrot snake mouse house table chair pencil paper letter number music piano
guitar violin drum candle lamp mirror clock watch phone camera cloud storm rain snow wind
ocean island desert valley mountain hill lake stone sand shell coral pearl ruby magic dream
story poem song dance smile laugh happy brave quiet gentle bright dark light shadow sun moon
star comet sky earth fire water bread butter cheese honey sugar salt pepper lemon cherry
grape melon peach plum carrot potato tomato onion garlic rice pasta pizza cookie cake
coffee tea milk juice boat train plane truck bicycle road street city village farm school
teacher doctor friend family mother father sister brother baby child king queen prince
knight robot computer engine wheel door key lock box bag shoe hat coat shirt glove scarf
green blue red white black pink brown gray kitten puppy bird fish frog bee ant spider
""".split())

# Facts about Falcon Mamba the instruct model learns to state (paraphrased questions -> one answer).
FALCON_FACTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("What is Falcon Mamba?", "Tell me about Falcon Mamba.", "What kind of model is Falcon Mamba?"),
     "Falcon Mamba is an attention-free language model built on the Mamba state space architecture."),
    (("Who made Falcon Mamba?", "Who created Falcon Mamba?", "Which institute built Falcon Mamba?"),
     "Falcon Mamba was made by the Technology Innovation Institute (TII) in Abu Dhabi."),
    (("Does Falcon Mamba use attention?", "Is Falcon Mamba a transformer?",
      "Does Falcon Mamba have attention layers?"),
     "No. Falcon Mamba has no attention; it reads text with a recurrent state space model."),
    (("How many parameters does Falcon Mamba have?", "How big is Falcon Mamba?",
      "What is the size of Falcon Mamba?"),
     "Falcon Mamba 7B has about 7 billion parameters."),
    (("Does the memory of Falcon Mamba grow with the context?",
      "How much memory does Falcon Mamba need for a long text?",
      "Why is Falcon Mamba good for long conversations?"),
     "Its recurrent state has a constant size, so memory and speed per token do not grow with the length of the text."),
    (("What architecture does Falcon Mamba use?", "What is Falcon Mamba based on?"),
     "Falcon Mamba uses the Mamba architecture, a selective state space model."),
    (("Are you Falcon Mamba 7B?", "Who are you?", "What are you?"),
     "I am a tiny demo model in the Falcon Mamba format, not the real Falcon Mamba 7B."),
)

SMALL_TALK: tuple[tuple[tuple[str, ...], str], ...] = (
    (("Hello!", "Hi!", "Hello, how are you?", "Good morning!"), "Hello! How can I help you today?"),
    (("Thank you!", "Thanks!", "Thanks a lot."), "You are welcome!"),
    (("Goodbye!", "Bye!", "See you later."), "Goodbye! Have a nice day."),
)

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a friendly and concise assistant.",
    "Answer briefly.",
)

# Base-model story ingredients.
NAMES = ("Anna", "Ben", "Lina", "Omar", "Sara", "Tom", "Maya", "Leo", "Nora", "Sam", "Zara", "Max")
ANIMALS = ("cat", "dog", "rabbit", "fox", "bear", "owl", "duck", "horse", "mouse", "turtle", "falcon", "frog")
PLACES = ("forest", "village", "garden", "big city", "small farm", "house by the lake", "valley",
          "castle", "desert", "island")
ACTIVITIES = ("run in the grass", "read old books", "sing songs", "play with a ball", "watch the stars",
              "swim in the river", "climb trees", "bake bread", "paint pictures", "count the clouds")
OBJECTS = ("box", "key", "stone", "book", "hat", "shell", "map", "lamp", "ball", "flower")
COLORS = ("red", "blue", "green", "yellow", "white", "black", "purple", "orange", "golden", "silver")
FEELINGS = ("happy", "surprised", "curious", "excited", "proud", "calm")
ANIMAL_FACTS = {
    "cat": "A cat is a small animal that likes to sleep in the sun.",
    "dog": "A dog is a loyal animal that likes to run and play.",
    "rabbit": "A rabbit has long ears and eats carrots and grass.",
    "fox": "A fox is a clever animal with a long red tail.",
    "bear": "A bear is a big strong animal that sleeps in winter.",
    "owl": "An owl is a bird that is awake at night.",
    "duck": "A duck is a bird that can swim and fly.",
    "horse": "A horse is a fast animal that can carry people.",
    "mouse": "A mouse is a tiny animal that likes cheese.",
    "turtle": "A turtle is a slow animal with a hard shell.",
    "falcon": "A falcon is a fast bird that hunts from the sky.",
    "frog": "A frog is a green animal that jumps and lives near water.",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
