"""mini-Taskonomy: procedurally rendered indoor scenes written in the exact release layout."""
