"""`cellmorph predict`: new images through a saved model, with conformal sets and novelty flags."""
