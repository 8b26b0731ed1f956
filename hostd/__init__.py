"""hostd"""
