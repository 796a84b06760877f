from guard.entry import console

console()
