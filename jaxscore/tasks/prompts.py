"""Default prompts of the SCoRe paper (arXiv 2409.12917); configs may override them."""

MATH_FIRST_TURN = (
    "You are a math expert. When you respond, respond only with the Solution of the "
    "final Problem, thinking step by step. At the end of the Solution, when you give "
    "your final answer, write it in the form \"Final Answer: The final answer is "
    "$answer$. I hope it is correct.\"")

MATH_SELF_CORRECTION = (
    "There might be an error in the solution above because of lack of understanding of "
    "the question. Please correct the error, if any, and rewrite the solution. Only "
    "output the final solution! At the end of the Solution, when you give your final "
    "answer, write it in the form \"Final Answer: The final answer is $answer$. I hope "
    "it is correct.\"")

CODE_SELF_CORRECTION = (
    "# There might be an error in the code above because of lack of understanding of "
    "the question. Please correct the error, if any, and rewrite the solution. Only "
    "output the final correct Python program!")
