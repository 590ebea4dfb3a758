"""The lab: fault targets that reproduce every mail flow intelligence error on demand."""
