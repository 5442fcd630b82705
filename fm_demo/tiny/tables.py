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
cat dog cow pig fox bear duck goat sheep owl hen egg cup pen bus car tree leaf rose book home
bed sock ship kite toy bell ring nest
""".split())

# Facts about Falcon Mamba the instruct model learns to state: (training questions, held-out
# questions, answer). The held-out paraphrases never appear in training (tests check it).
FALCON_FACTS: tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...] = (
    (("What is Falcon Mamba?", "Tell me about Falcon Mamba.", "What kind of model is Falcon Mamba?",
      "What's Falcon Mamba?", "Explain Falcon Mamba.", "Describe Falcon Mamba."),
     ("Can you explain what Falcon Mamba is?", "Give me a short description of Falcon Mamba."),
     "Falcon Mamba is an attention-free language model built on the Mamba state space architecture."),
    (("Who made Falcon Mamba?", "Who created Falcon Mamba?", "Which institute built Falcon Mamba?",
      "Who developed Falcon Mamba?", "Where does Falcon Mamba come from?"),
     ("Which team is behind Falcon Mamba?", "Who trained Falcon Mamba?"),
     "Falcon Mamba was made by the Technology Innovation Institute (TII) in Abu Dhabi."),
    (("Does Falcon Mamba use attention?", "Is Falcon Mamba a transformer?",
      "Does Falcon Mamba have attention layers?", "Is there attention in Falcon Mamba?"),
     ("Is Falcon Mamba built with attention?", "Does Falcon Mamba need attention?"),
     "No. Falcon Mamba has no attention; it reads text with a recurrent state space model."),
    (("How many parameters does Falcon Mamba have?", "How big is Falcon Mamba?",
      "What is the size of Falcon Mamba?", "How large is Falcon Mamba?"),
     ("What is the parameter count of Falcon Mamba?", "How many weights does Falcon Mamba have?"),
     "Falcon Mamba 7B has about 7 billion parameters."),
    (("Does the memory of Falcon Mamba grow with the context?",
      "How much memory does Falcon Mamba need for a long text?",
      "Why is Falcon Mamba good for long conversations?", "Does Falcon Mamba need more memory for long texts?"),
     ("Is Falcon Mamba good for long texts?", "How does Falcon Mamba handle a long context?"),
     "Its recurrent state has a constant size, so memory and speed per token do not grow with the length of the text."),
    (("What architecture does Falcon Mamba use?", "What is Falcon Mamba based on?",
      "Which architecture is Falcon Mamba?"),
     ("What architecture is behind Falcon Mamba?", "On which architecture is Falcon Mamba built?"),
     "Falcon Mamba uses the Mamba architecture, a selective state space model."),
    (("Are you Falcon Mamba 7B?", "Who are you?", "What are you?", "Are you Falcon Mamba?",
      "What model are you?"),
     ("Which model am I talking to?", "Are you the real Falcon Mamba?"),
     "I am a tiny demo model in the Falcon Mamba format, not the real Falcon Mamba 7B."),
)

# What the instruct model can do, in its own words: its reply to "What can you do?" and the end of
# its reply to anything outside that.
CAPABILITIES = ("I can add and subtract numbers up to 99, compare them, spell words, name capitals and "
                "remember a word.")
SCOPE_REPLY = "I am a tiny demo model and cannot do that. " + CAPABILITIES

SMALL_TALK: tuple[tuple[tuple[str, ...], str], ...] = (
    (("Hello!", "Hi!", "Hello, how are you?", "Good morning!"), "Hello! How can I help you today?"),
    (("Thank you!", "Thanks!", "Thanks a lot."), "You are welcome!"),
    (("Goodbye!", "Bye!", "See you later."), "Goodbye! Have a nice day."),
    (("What can you do?", "What can I ask you?", "Help", "How can you help me?", "What do you know?"),
     "I am a tiny demo model. " + CAPABILITIES),
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

# ---- out of scope: what the instruct model learns to decline -------------------------------------
# Each pool is split once into a training part and a held-out part (the second tuple) that never
# appears in training, so the evaluation asks questions of a kind the model has not seen declined.
UNKNOWN_WORDS = (tuple("""
mamba llama jaguar python wizard pirate jungle rainbow thunder volcano tornado blanket pillow
kettle teapot saucer spoon fork knife plate bottle basket ladder hammer shovel bucket
tractor subway taxi airport harbor tunnel tower temple palace museum library hospital office
market bakery cinema theater circus concert festival holiday picnic journey ticket passport
wallet pocket button zipper jacket sweater trousers boots sandal helmet umbrella diamond
crystal marble pebble meadow canyon glacier lagoon swamp prairie orchard vineyard lobster
octopus dolphin whale shark penguin giraffe monkey gorilla kangaroo koala panda squirrel
hamster beaver walnut almond peanut cabbage lettuce spinach pumpkin mango papaya avocado
noodle dumpling pancake waffle muffin yogurt sausage cereal popcorn chocolate vanilla
blizzard drizzle sunrise sunset midnight weekend birthday question answer problem secret
""".split()), tuple("""
walrus hedgehog flamingo raccoon cactus tulip lantern compass anchor saddle trumpet
harp kayak canoe igloo cabin attic balcony chimney garage puzzle marathon galaxy nebula
asteroid orbit quartz velvet cotton leather tangerine apricot broccoli celery biscuit pretzel
""".split()))
UNKNOWN_COUNTRIES = (
    ("Nepal", "Cuba", "Ghana", "Nigeria", "Sudan", "Libya", "Syria", "Jordan", "Lebanon",
     "Pakistan", "Afghanistan", "Bangladesh", "Mongolia", "South Korea", "Malaysia", "Singapore",
     "the Philippines", "New Zealand", "Iceland", "Belgium", "the Netherlands", "Switzerland",
     "Romania", "Bulgaria", "Serbia", "Croatia", "Ukraine", "Estonia", "Latvia", "Venezuela",
     "Bolivia", "Ecuador", "Uruguay", "Paraguay", "Jamaica", "Panama", "Ethiopia", "Somalia",
     "Tanzania", "Uganda", "Angola", "Zambia", "Algeria", "Tunisia", "Senegal", "Oman", "Yemen",
     "Kuwait", "Sri Lanka", "Cambodia", "Atlantis", "Mars", "the Moon"),
    ("Bhutan", "Laos", "Myanmar", "Zimbabwe", "Mali", "Lithuania", "Slovakia", "Haiti", "Fiji",
     "Georgia", "Armenia", "Cyprus", "Malta", "Narnia", "Jupiter"),
)
CREATIVE = (  # (forms, topics): "Write a poem about the sea."
    (("poem", "story", "joke", "song", "haiku", "essay", "letter", "limerick", "riddle", "speech",
      "fairy tale", "recipe", "short story", "rap"),
     ("the sea", "love", "cats", "the moon", "winter", "a dragon", "my dog", "friendship", "space",
      "the rain", "a robot", "school", "summer", "the city", "a king", "music", "coffee", "trees")),
    (("sonnet", "ballad", "bedtime story", "blog post", "lullaby"),
     ("the ocean", "autumn leaves", "a lost cat", "the stars", "my birthday", "a pirate ship")),
)
OPEN_QUESTIONS = ((
    "What is the meaning of life?", "Why is the sky blue?", "How do I bake a cake?", "What time is it?",
    "What's the weather like today?", "Who won the last World Cup?", "Can you help me with my homework?",
    "What should I name my dog?", "Translate hello into French.", "Write some Python code.",
    "How does a car engine work?", "What is love?", "Do you have feelings?", "Recommend a good book.",
    "What is the best movie ever?", "How tall is Mount Everest?", "Who is the president of France?",
    "What is a black hole?", "How do airplanes fly?", "What is photosynthesis?", "Tell me the news.",
    "What is the population of Japan?", "How old is the universe?", "Explain quantum physics.",
    "What should I cook for dinner?", "How do I learn to swim?", "What is the speed of light?",
    "Who wrote Hamlet?", "What language is spoken in Brazil?", "How do I fix my bike?",
    "Tell me about dinosaurs.", "Tell me about the Roman Empire.", "What is the best programming language?",
    "Is it going to rain tomorrow?", "Can you sing?", "What is your favorite color?", "Do you dream?",
    "What is the square root of 2?", "What is 6 times 7?", "Multiply 8 by 9.", "Divide 50 by 5.",
    "What is 12 * 4?", "How many days are in a year?", "What day is it today?", "Who painted the Mona Lisa?",
    "How far away is the moon?", "What is the tallest animal?", "How do I make friends?",
    "What is the largest country in the world?", "What is the capital city of the world?",
    "Can you play chess?", "Solve x + 3 = 7.", "What is 2 to the power of 10?", "Summarize this article.",
    "Give me some advice.", "What is machine learning?", "How do vaccines work?", "Why do cats purr?",
    "What does DNA stand for?", "Who invented the telephone?", "How many legs does a spider have?",
    "What is the boiling point of water?", "Tell me something interesting.", "Are you alive?",
    "Which is the longest river?", "How do I get rich?", "What is the best pizza topping?",
    "Spell the alphabet backwards.", "Count to a thousand.", "Write a shopping list.",
    "What color is an apple?", "Is a tomato a fruit?", "What animal says moo?", "Where do penguins live?",
), (
    "Why is the grass green?", "How do I change a tire?", "What is the weather in Paris?",
    "Who discovered gravity?", "Explain how the internet works.", "What should I do this weekend?",
    "What is 7 squared?", "Half of 81?", "How many hours are in a week?", "What is the smallest planet?",
    "Tell me about the pyramids.", "Can you recommend a movie?", "What is your name?",
    "How do I become a doctor?", "What is the biggest ocean?", "Why do birds sing?",
    "Who is the best football player?", "What is artificial intelligence?", "Do you like music?",
    "How do I sleep better?", "What is the color of the sun?", "Where do lions live?",
))
