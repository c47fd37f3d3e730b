"""Evaluation: does the model still know what it should forget, and everything else?"""
