"""Built-in labelled sets for symbolic mapping, generated from templates so that every label is right by construction.

They stand in for SuperGLUE (BoolQ, WiC, RTE, WSC) and CLUE (AFQMC, CSL, OCNLI, CLUEWSC2020) when no local copy of
those is given, and use the same JSON field layouts, so built-in and real records go through one parser. They are
far easier and smaller than the real sets: numbers on them are for relative comparison, not for the paper's table.

Each set is fixed (its own seed, independent of the run's seed) and balanced over labels: POOL_SIZE records.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from functools import cache

POOL_SIZE = 200

# -- SuperGLUE-like (English) --------------------------------------------------------------------------------------

_TOWN_HEADS = ("Kel", "Bran", "Hol", "Ash", "Mor", "Fen", "Dun", "Stan", "Wick", "Cor", "Lan", "Elm")
_TOWN_TAILS = ("brook", "ford", "ton", "by", "stead", "mere", "ham", "field")
_TOWN_FACTS = {
    "river": ("Amber", "Tessa", "Calder", "Wren", "Loxley", "Marrow"),
    "century": ("twelfth", "fourteenth", "sixteenth", "eighteenth"),
    "region": ("the northern hills", "the eastern plains", "the western coast", "the southern valley"),
    "famous": ("its wool market", "a glass museum", "an annual kite festival", "its stone bridge",
               "a tall clock tower", "cherry orchards"),
}
_TOWN_QUESTIONS = {
    "river": "is {town} on the river {value}",
    "century": "was {town} founded in the {value} century",
    "region": "is {town} in {value}",
    "famous": "is {town} known for {value}",
}


def _boolq(rng: random.Random, label: bool) -> dict:
    town = rng.choice(_TOWN_HEADS) + rng.choice(_TOWN_TAILS)
    facts = {k: rng.choice(v) for k, v in _TOWN_FACTS.items()}
    passage = (f"{town} is a small town in {facts['region']}. It lies on the river {facts['river']} and was founded "
               f"in the {facts['century']} century. Today it is best known for {facts['famous']}.")
    asked = rng.choice(sorted(_TOWN_FACTS))
    value = facts[asked] if label else rng.choice([v for v in _TOWN_FACTS[asked] if v != facts[asked]])
    question = _TOWN_QUESTIONS[asked].format(town=town.lower(), value=value)
    return {"passage": passage, "question": question, "label": label}


_SENSES = {  # word -> two senses, three sentences each
    "bank": (("We had a picnic on the bank of the river.", "The boat drifted toward the muddy bank.",
              "Reeds grew along the bank of the stream."),
             ("She opened an account at the bank.", "The bank approved his loan.", "He works at a bank downtown.")),
    "bat": (("A bat flew out of the cave at dusk.", "The bat hung upside down from the branch.",
             "We saw a bat catching insects."),
            ("He swung the bat and hit the ball.", "She bought a new cricket bat.",
             "The player dropped his bat and ran.")),
    "bark": (("The bark of the old oak was rough.", "Moss covered the bark of the tree.",
              "Beetles live under the bark."),
             ("The dog let out a loud bark.", "We heard a bark from the yard.", "The bark woke the whole street.")),
    "spring": (("The flowers bloom in spring.", "We plant seeds every spring.", "Spring arrived early this year."),
               ("The spring in the mattress broke.", "He replaced the spring inside the pen.",
                "The toy jumps when you press the spring.")),
    "light": (("Turn on the light in the hall.", "The light from the lamp was dim.", "Morning light filled the room."),
              ("The box is light enough to carry.", "She packed a light bag for the trip.",
               "This jacket is very light.")),
    "match": (("He struck a match to light the candle.", "The match burned his fingers.",
               "She kept a match in her pocket for the stove."),
              ("Our team won the match.", "The tennis match lasted three hours.", "They watched the match on TV.")),
    "ring": (("She wore a gold ring.", "He lost his ring in the sand.", "The ring had a small diamond."),
             ("I heard the ring of the doorbell.", "The phone gave a short ring.", "The ring of the bell echoed.")),
    "key": (("I lost the key to the front door.", "She turned the key in the lock.",
             "The key was hidden under the mat."),
            ("The song is written in the key of C.", "He changed the key halfway through the song.",
             "The choir sang in a minor key.")),
    "pitch": (("The players ran onto the pitch.", "Rain flooded the football pitch.", "The pitch was freshly mowed."),
              ("Her voice has a high pitch.", "The pitch of the whistle hurt my ears.",
               "He sang every note at the right pitch.")),
    "seal": (("A seal rested on the rocks.", "The seal dived into the icy water.", "We watched a seal catch a fish."),
             ("Break the seal before opening the jar.", "The letter had a wax seal.",
              "The seal on the bottle was broken.")),
}


def _wic(rng: random.Random, label: bool) -> dict:
    word = rng.choice(sorted(_SENSES))
    senses = _SENSES[word]
    if label:
        s1, s2 = rng.sample(rng.choice(senses), 2)
    else:
        first, second = rng.sample(senses, 2)
        s1, s2 = rng.choice(first), rng.choice(second)
    return {"word": word, "sentence1": s1, "sentence2": s2, "label": label}


_PERSONS = ("Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas")
_JOBS = ("teacher", "doctor", "pilot", "baker", "farmer", "lawyer", "chemist", "painter")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Perth")
_EVENTS = ("opened a small bakery", "won a chess tournament", "published a novel", "climbed a famous mountain",
           "started a cycling club")
_UNSUPPORTED = ("has three children.", "owns a red car.", "speaks four languages.", "was born in a small village.")


def _rte(rng: random.Random, label: str) -> dict:
    name, job, city, event = rng.choice(_PERSONS), rng.choice(_JOBS), rng.choice(_CITIES), rng.choice(_EVENTS)
    year = rng.randint(1990, 2020)
    premise = f"{name}, a {job} from {city}, {event} in {year}."
    other_job = rng.choice([j for j in _JOBS if j != job])
    other_city = rng.choice([c for c in _CITIES if c != city])
    if label == "entailment":
        hypothesis = rng.choice((f"{name} is a {job}.", f"{name} is from {city}.", f"{name} {event}."))
    else:
        hypothesis = rng.choice((f"{name} is a {other_job}.", f"{name} is from {other_city}.",
                                 f"{name} {event} in {year + rng.randint(1, 5)}.",
                                 f"{name} {rng.choice(_UNSUPPORTED)}"))
    return {"premise": premise, "hypothesis": hypothesis, "label": label}


_FEMALE = ("Alice", "Emma", "Sara", "Lucy", "Nora", "Maya")
_MALE = ("Tom", "Jack", "Omar", "Leo", "Paul", "Ivan")
# (template, which of X/Y the pronoun refers to); X and Y differ in gender, so the pronoun has one referent.
_WSC_TEMPLATES = (
    ("{X} gave {Y} a book because {P} had finished reading it.", "X"),
    ("{X} thanked {Y} because {P} had fixed the bike.", "Y"),
    ("{X} waited for {Y} because {P} was running late.", "Y"),
    ("{X} could not lift the box, so {P} asked {Y} for help.", "X"),
    ("{X} lent {Y} an umbrella because {P} had forgotten one.", "Y"),
    ("{X} beat {Y} at chess because {P} had practised all week.", "X"),
)


def _wsc(rng: random.Random, label: bool) -> dict:
    template, referent = rng.choice(_WSC_TEMPLATES)
    female, male = rng.choice(_FEMALE), rng.choice(_MALE)
    x, y = (female, male) if rng.random() < 0.5 else (male, female)
    names = {"X": x, "Y": y}
    pronoun = "she" if names[referent] == female else "he"
    text = template.format(X=x, Y=y, P=pronoun)
    candidate = names[referent] if label else names["Y" if referent == "X" else "X"]
    words = [w.strip(".,") for w in text.split()]
    return {"text": text, "target": {"span1_text": candidate, "span1_index": words.index(candidate),
                                     "span2_text": pronoun, "span2_index": words.index(pronoun)}, "label": label}


# -- CLUE-like (Chinese) -------------------------------------------------------------------------------------------

_INTENTS = (  # each row: ways of asking the same question
    ("信用卡怎么还款", "信用卡如何还钱", "怎样给信用卡还款", "信用卡的钱要怎么还"),
    ("怎么提高信用卡额度", "信用卡额度如何提升", "信用卡怎样才能提额", "想把信用卡额度调高怎么办"),
    ("银行卡密码怎么修改", "如何更改银行卡密码", "银行卡的密码可以改吗", "我想换一个银行卡密码"),
    ("转账多久能到账", "转账一般几天到账", "转出去的钱什么时候到账", "转账要等多长时间才到"),
    ("怎么注销我的账户", "账户如何注销", "我想把账户注销掉", "注销账户要怎么操作"),
    ("借款的利息怎么算", "借钱的利息是多少", "贷款利率如何计算", "借款要付多少利息"),
    ("逾期还款会怎样", "晚几天还款有什么影响", "还款逾期了怎么办", "没有按时还款会有什么后果"),
    ("怎么绑定银行卡", "如何添加一张银行卡", "银行卡绑定的方法", "在哪里绑定新的银行卡"),
    ("退款多久到账", "退的钱什么时候能收到", "申请退款后几天到账", "退款一般要等多久"),
    ("提现要手续费吗", "提现收不收手续费", "把钱提出来要付费吗", "提现的费用是多少"),
)


def _afqmc(rng: random.Random, label: str) -> dict:
    if label == "1":
        s1, s2 = rng.sample(rng.choice(_INTENTS), 2)
    else:
        first, second = rng.sample(_INTENTS, 2)
        s1, s2 = rng.choice(first), rng.choice(second)
    return {"sentence1": s1, "sentence2": s2, "label": label}


_ZH_NAMES = ("王芳", "李明", "张伟", "刘洋", "陈静", "杨帆", "赵磊", "孙丽")
_ZH_JOBS = ("教师", "医生", "厨师", "司机", "律师", "画家", "护士", "工程师")
_ZH_CITIES = ("北京", "上海", "广州", "成都", "西安", "杭州", "武汉", "南京")
_ZH_HABITS = ("骑自行车上班", "早上去公园跑步", "晚上看书", "坐地铁上班")
_ZH_NEUTRAL = ("有两个孩子", "喜欢吃辣", "去年去过日本", "会弹钢琴")


def _ocnli(rng: random.Random, label: str) -> dict:
    name, job, city, habit = rng.choice(_ZH_NAMES), rng.choice(_ZH_JOBS), rng.choice(_ZH_CITIES), rng.choice(_ZH_HABITS)
    premise = f"{name}是一名{job}，住在{city}，每天{habit}。"
    hypothesis = {
        "entailment": (f"{name}住在{city}。", f"{name}的职业是{job}。", f"{name}每天{habit}。"),
        "contradiction": (f"{name}不是{job}。", f"{name}从来不{habit}。", f"{name}不住在{city}。"),
        "neutral": tuple(f"{name}{fact}。" for fact in _ZH_NEUTRAL),
    }[label]
    return {"sentence1": premise, "sentence2": rng.choice(hypothesis), "label": label}


_FIELDS = (  # (tasks, methods, features, data)
    (("图像分割", "目标检测", "图像去噪", "人脸识别"), ("卷积神经网络", "注意力机制", "生成对抗网络"),
     ("多尺度特征", "边缘信息", "颜色直方图"), ("公开图像数据集", "遥感图像数据")),
    (("文本分类", "情感分析", "机器翻译", "命名实体识别"), ("预训练语言模型", "循环神经网络", "条件随机场"),
     ("词向量", "句法结构", "字符特征"), ("新闻语料", "社交媒体文本")),
    (("负荷预测", "故障诊断", "电网调度"), ("支持向量机", "粒子群优化", "长短期记忆网络"),
     ("历史负荷数据", "小波变换", "温度信息"), ("某省电网数据", "变电站监测数据")),
    (("疾病预测", "医学影像分类", "药物推荐"), ("随机森林", "图神经网络", "迁移学习"),
     ("电子病历", "基因表达数据", "影像纹理"), ("医院临床数据", "公开医学数据集")),
)


def _csl(rng: random.Random, label: str) -> dict:
    field_index = rng.randrange(len(_FIELDS))
    tasks, methods, features, data = _FIELDS[field_index]
    task, method, feature = rng.choice(tasks), rng.choice(methods), rng.choice(features)
    abstract = (f"针对{task}问题，本文提出了一种基于{method}的新方法。该方法首先利用{feature}提取特征，"
                f"然后通过{method}进行建模。在{rng.choice(data)}上的实验表明，该方法的准确率明显优于现有方法。")
    keywords = [task, method, feature]
    if label == "0":  # one keyword comes from another field and is absent from the abstract
        other = _FIELDS[rng.choice([i for i in range(len(_FIELDS)) if i != field_index])]
        keywords[rng.randrange(3)] = rng.choice(rng.choice(other[:3]))
    return {"abst": abstract, "keyword": keywords, "label": label}


_ZH_PEOPLE = ("小明", "老王", "李叔叔", "刘师傅", "小刚")
_ZH_ANIMALS = ("小狗", "小猫", "兔子", "小鸭", "小羊")
# (template, referent): the pronoun 它 can only mean the animal and 他 only the one person.
_CLUEWSC_TEMPLATES = (
    ("{P}给{A}喂了食物，因为它饿了。", "A"),
    ("{P}抱起了{A}，因为他很喜欢小动物。", "P"),
    ("{A}一直跟着{P}，因为他手里拿着肉。", "P"),
    ("{P}带{A}去看兽医，因为它生病了。", "A"),
    ("{A}对着{P}叫个不停，因为它不认识陌生人。", "A"),
    ("{P}没有追上{A}，因为他跑得太慢了。", "P"),
)


def _cluewsc(rng: random.Random, label: str) -> dict:
    template, referent = rng.choice(_CLUEWSC_TEMPLATES)
    names = {"P": rng.choice(_ZH_PEOPLE), "A": rng.choice(_ZH_ANIMALS)}
    pronoun = "它" if referent == "A" else "他"
    text = template.format(**names)
    candidate = names[referent] if label == "true" else names["P" if referent == "A" else "A"]
    return {"text": text, "target": {"span1_text": candidate, "span1_index": text.index(candidate),
                                     "span2_text": pronoun, "span2_index": text.index(pronoun)}, "label": label}


# name -> (record generator, the label values it balances over)
GENERATORS: dict[str, tuple[Callable[[random.Random, object], dict], tuple]] = {
    "boolq": (_boolq, (True, False)),
    "wic": (_wic, (True, False)),
    "rte": (_rte, ("entailment", "not_entailment")),
    "wsc": (_wsc, (True, False)),
    "afqmc": (_afqmc, ("1", "0")),
    "csl": (_csl, ("1", "0")),
    "ocnli": (_ocnli, ("entailment", "neutral", "contradiction")),
    "cluewsc2020": (_cluewsc, ("true", "false")),
}


@cache
def builtin_records(name: str) -> tuple[dict, ...]:
    """POOL_SIZE distinct records of set `name`, labels in turn, always the same ones."""
    make, labels = GENERATORS[name]
    rng = random.Random(f"flm-iq-builtin/{name}")
    out: dict[str, dict] = {}
    for i in range(POOL_SIZE):
        for _ in range(1000):
            record = make(rng, labels[i % len(labels)])
            key = json.dumps({k: v for k, v in record.items() if k != "label"}, ensure_ascii=False, sort_keys=True)
            if key not in out:
                out[key] = record
                break
        else:
            raise RuntimeError(f"built-in set {name} has fewer than {POOL_SIZE} distinct records")
    return tuple(out.values())
