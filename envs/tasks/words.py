"""Short, distinct, easy-to-read words that tasks show and ask about."""

NOUNS = (
    "apple", "anchor", "banana", "bridge", "candle", "castle", "cherry", "cloud",
    "dragon", "falcon", "forest", "garden", "guitar", "hammer", "island", "jacket",
    "kettle", "ladder", "lemon", "magnet", "mango", "marble", "mirror", "monkey",
    "needle", "orange", "panda", "pepper", "pillow", "planet", "pocket", "rabbit",
    "rocket", "saddle", "silver", "tiger", "tomato", "tunnel", "violin", "window",
)
