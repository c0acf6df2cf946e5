"""Small English word lists the generators draw from (common words, so difficulty lies in the rule, not the words)."""

from __future__ import annotations

NOUNS = ("apple", "river", "stone", "cloud", "tiger", "music", "paper", "table", "chair", "bread", "water", "plant",
         "house", "train", "sugar", "dream", "ocean", "pencil", "garden", "window", "bottle", "candle", "rabbit",
         "forest", "planet", "spider", "summer", "winter", "butter", "castle", "dragon", "lemon", "mango", "island",
         "market", "letter", "mirror", "basket", "violin", "ladder")

COLOURS = ("red", "blue", "green", "black", "white", "brown", "grey", "pink", "yellow", "purple")
SIZES = ("small", "large", "old", "new", "quiet", "bright", "heavy", "tiny", "long", "short")
ANIMALS = ("cat", "dog", "bird", "horse", "fox", "goat", "mouse", "duck", "sheep", "wolf")
THINGS = ("car", "boat", "lamp", "kite", "drum", "ball", "book", "cup", "hat", "key")
VERBS = ("sees", "follows", "passes", "finds", "likes", "watches", "chases", "carries", "paints", "hides")

PEOPLE = ("Mary", "John", "Sandra", "Daniel", "Alice", "Peter", "Laura", "Omar")
PLACES = ("bathroom", "hallway", "garden", "office", "kitchen", "bedroom", "cellar", "garage")
OBJECTS = ("football", "apple", "milk", "key", "book", "umbrella")

NAMES = ("Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tariq", "Uma", "Victor", "Wanda", "Yusuf")
